import pytest

from ptq.config import (
    BiasCorrection,
    BitConvention,
    ConfigError,
    QuantConfig,
    Recipe,
    dump_recipe,
    load_recipe,
    recipe_names,
)


def test_shipped_recipe_loads_and_round_trips(tmp_path):
    assert "rtn" in recipe_names()
    recipe = load_recipe("rtn")
    assert recipe.quant.first_last_bits is BitConvention.QDROP
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(recipe))
    assert load_recipe(str(path)) == recipe


def test_overrides_are_typed_and_validated():
    recipe = load_recipe("rtn", ["quant.w_bits=4", "quant.first_last_bits=all", "calib.num_images=16"])
    assert recipe.quant.w_bits == 4 and recipe.quant.first_last_bits is BitConvention.ALL
    assert recipe.calib.num_images == 16
    with pytest.raises(ConfigError, match="unknown key quant.w_bit; allowed under quant.: w_bits"):
        load_recipe("rtn", ["quant.w_bit=4"])
    with pytest.raises(ConfigError, match="must be one of: all, brecq, qdrop"):
        load_recipe("rtn", ["quant.first_last_bits=first"])
    with pytest.raises(ConfigError, match="from 2 to 8"):
        load_recipe("rtn", ["quant.w_bits=9"])
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe("rtn", ["quant.w_bits"])
    with pytest.raises(ConfigError, match="must be true or false"):
        load_recipe("rtn", ["quant.fold_bn=maybe"])


def test_an_unquoted_off_is_the_choice_off_not_a_boolean(tmp_path):
    assert load_recipe("fast", ["quant.bias_correction=off"]).quant.bias_correction is BiasCorrection.OFF
    path = tmp_path / "r.yaml"
    path.write_text("type: ptq.Recipe\nversion: 1\nquant:\n  bias_correction: off\n")
    assert load_recipe(str(path)).quant.bias_correction is BiasCorrection.OFF
    with pytest.raises(ConfigError, match="must be one of: all, brecq, qdrop"):
        load_recipe("rtn", ["quant.first_last_bits=off"])


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="shipped recipes: .*rtn"):
        load_recipe("fastest")


def test_configs_check_themselves():
    with pytest.raises(ConfigError):
        QuantConfig(w_bits=1)
    with pytest.raises(ConfigError, match="must be one of"):
        QuantConfig(a_observer="mean")
    assert QuantConfig(a_observer="minmax").a_observer.value == "minmax"
    with pytest.raises(ConfigError, match="version 2"):
        Recipe.from_dict({"version": 2})
