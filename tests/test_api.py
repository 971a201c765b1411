"""The Python front door: ptq.quantize / synthesize / evaluate / load_quantized on timm names and in-memory models."""

import re

import pytest
import timm
import torch
from conftest import ROOT, SAMPLES
from torch import nn

import ptq
from ptq.data import ImageFolder

SIZE = {"input_size": (3, 64, 64)}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("test_resnet").eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(24, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_in_memory_model_tensor_or_loader_and_reload(tmp_path, tiny, images):
    qmodel = ptq.quantize(tiny, calib=images, recipe="rtn", w_bits=4, a_bits=8, data_config=SIZE, device="cpu")
    assert isinstance(qmodel, ptq.QuantizedModel) and qmodel.name == "test_resnet"
    assert {v["w_bits"] for v in qmodel.bits.values()} == {4, 8}  # first/last at 8 (qdrop convention)
    assert qmodel.report.calibration == {"data": "in-memory images", "images": 24, "synthetic": None}
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(24)), batch_size=10)
    again = ptq.quantize(tiny, calib=loader, recipe="rtn", w_bits=4, a_bits=8, data_config=SIZE, device="cpu")
    x = images[:4]
    with torch.no_grad():
        assert qmodel(x).shape == tiny(x).shape
        assert torch.equal(qmodel(x), again(x))
        assert not torch.equal(qmodel(x), tiny(x))  # quantized, and the original left untouched
        assert all(isinstance(m, nn.Conv2d) for m in tiny.modules() if "conv" in type(m).__name__.lower())
    qmodel.save(tmp_path / "out")
    with pytest.raises(Exception, match="not empty|exists"):
        qmodel.save(tmp_path / "out")  # nothing a user made is overwritten silently
    loaded = ptq.load_quantized(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    assert loaded.recipe.quant.w_bits == 4 and loaded.report.w_bits == 4 and loaded.report.size["ratio"] < 0.3


def test_a_model_timm_does_not_know(tmp_path, images):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()  # fmt: skip
    with pytest.raises(ptq.ConfigError, match="not a timm model.*data_config"):
        ptq.quantize(model, calib=images, recipe="rtn")
    qmodel = ptq.quantize(model, calib=images, recipe="rtn", data_config=SIZE, device="cpu")
    qmodel.save(tmp_path / "seq")
    with pytest.raises(Exception, match="pass the FP model"):
        ptq.load_quantized(tmp_path / "seq")
    with torch.no_grad():
        assert torch.equal(ptq.load_quantized(tmp_path / "seq", model=model)(images), qmodel(images))


def test_keyword_overrides_are_typed_and_checked(tiny, images):
    run = dict(calib=images, recipe="rtn", data_config=SIZE, device="cpu")
    for bad, message in [
        ({"w_bits": "four"}, "w_bits takes a bit width"),
        ({"a_bits": 9}, "a_bits must be an integer from 2 to 8"),
        ({"synth_iter": 5}, "unknown option 'synth_iter'; did you mean synth_iters"),
        ({"bias_correction": "sometimes"}, "must be one of: off, empirical, analytic, auto"),
        ({"calib_num_images": "16"}, "calib.num_images must be int"),  # no string is re-parsed
        ({"bits": "auto"}, "needs a budget"),
    ]:
        with pytest.raises(ptq.ConfigError, match=re.escape(message) if "(" in message else message):
            ptq.quantize(tiny, **run, **bad)
    with pytest.raises(ptq.ConfigError, match=r"\(N, C, H, W\)"):
        ptq.quantize(tiny, calib=images[0], recipe="rtn", data_config=SIZE)


def test_synthesize_and_evaluate(tmp_path, tiny):
    fake = torch.randn(8, 3, 64, 64)
    images = ptq.synthesize(tiny, 8, method="intraq", synth_iters=2, synth_batch_size=8, data_config=SIZE,
                            out=tmp_path / "synth", device="cpu")  # fmt: skip
    assert images.shape == fake.shape and torch.isfinite(images).all()
    assert torch.equal(ptq.synthesize(tiny, 8, method="intraq", synth_iters=2, synth_batch_size=8, data_config=SIZE,
                                      out=tmp_path / "synth", device="cpu"), images)  # fmt: skip  # reused
    qmodel = ptq.quantize(tiny, calib="zero-shot", recipe="rtn", bits=8, synth_iters=2, num_images=8,
                          synth_batch_size=8, data_config=SIZE, device="cpu")  # fmt: skip
    assert qmodel.report.calibration["data"] == "synthetic" and qmodel.report.calibration["images"] == 8
    rows = ptq.evaluate([(qmodel, tiny), tiny], SAMPLES, device="cpu")
    assert [r.kind for r in rows] == ["quantized", "fp"] and all(r.error is None for r in rows)
    assert rows[0].images == len(ImageFolder(SAMPLES, qmodel.data_config)) and rows[0].sqnr_db > 10
    assert rows[1].agreement is None


def test_the_default_corrects_biases_analytically_only_for_synthetic_images_and_8_bit_activations(tiny, images):
    """`quant.bias_correction=auto` (the default recipe's): from the BatchNorm statistics when the calibration set
    is synthetic and activations keep 8 bits; empirically otherwise. The report names the choice."""
    run = dict(recipe="fast", method="gptq", w_bits=4, data_config=SIZE, device="cpu")
    zero_shot = dict(calib="zero-shot", synth_iters=2, num_images=8, synth_batch_size=8)

    def chosen(**kw):
        qmodel = ptq.quantize(tiny, **run, **kw)
        assert qmodel.recipe.quant.bias_correction.value == qmodel.report.rounding["bias_correction"]
        return qmodel.report.rounding["bias_correction"]

    assert chosen(**zero_shot, a_bits=8) == "analytic"
    assert chosen(**zero_shot, a_bits=4) == "empirical"
    assert chosen(calib=images, a_bits=8) == "empirical"
    assert chosen(**zero_shot, a_bits=8, bias_correction="empirical") == "empirical"  # an explicit choice stays


def test_sensitivity_then_quantize_with_its_table(tmp_path, tiny, images):
    """ptq.sensitivity writes the table `ptq sensitivity` writes; quantize(w_bits="auto", sensitivity=...) reuses it
    and gets the allocation it chose."""
    run = dict(calib=images, data_config=SIZE, device="cpu", mixed_avg_bits=5.0)
    result = ptq.sensitivity(tiny, **run, out=tmp_path / "sens", num_images=8, mixed_probes=2)
    assert result["table"]["images"] == 8 and result["budget"]["avg_bits"] == 5.0
    assert (tmp_path / "sens" / "sensitivity.json").is_file() and (tmp_path / "sens" / "sensitivity.csv").is_file()
    chosen = result["chosen"]["bits"]
    assert set(chosen.values()) <= {2, 3, 4, 5, 6, 8} and result["chosen"]["avg_bits"] <= 5.0 + 1e-6
    with pytest.raises(Exception, match="not empty|exists"):
        ptq.sensitivity(tiny, **run, out=tmp_path / "sens", num_images=8, mixed_probes=2)
    qmodel = ptq.quantize(tiny, **run, recipe="rtn", w_bits="auto", sensitivity=tmp_path / "sens")
    assert {name: bits["w_bits"] for name, bits in qmodel.bits.items() if name in chosen} == chosen


def test_the_readme_python_section_runs_as_written(tmp_path, monkeypatch):
    """The README's Python section, executed as written from a folder holding the repository's data/."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))
    assert "ptq.quantize" in code and "ptq.evaluate" in code
    (tmp_path / "data").symlink_to(ROOT / "data")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "runs" / "lite0-w8a8" / "model.safetensors").is_file()
