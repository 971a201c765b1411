import json

import pytest
import timm
import torch
from conftest import random_bn_stats

from ptq.config import QuantConfig
from ptq.export import load_quantized, save_quantized
from ptq.export.checkpoint import CheckpointError, fp32_weight_bytes
from ptq.quant import calibrate, prepare
from ptq.quant.functional import sqnr_db


def _quantized(name="test_efficientnet", w_bits=4, a_bits=8, convention="all"):
    torch.manual_seed(0)
    model = random_bn_stats(timm.create_model(name))
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits, first_last_bits=convention)
    return model, calibrate(prepare(model, config, x[:1]), [x], config), config, x


@pytest.mark.parametrize("w_bits", [2, 3, 4, 8])
def test_save_load_is_bit_identical(tmp_path, w_bits):
    model, qmodel, config, x = _quantized(w_bits=w_bits, convention="qdrop")
    save_quantized(qmodel, tmp_path, "test_efficientnet", config, {"input_size": (3, 64, 64)})
    loaded = load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(qmodel(x), loaded(x))
    meta = json.loads((tmp_path / "quant_config.json").read_text())
    assert meta["format_version"] == 1 and meta["bit_convention"] == "qdrop"
    assert meta["layers"]["blocks.4.0.module.conv_pw"]["w_bits"] == w_bits
    assert meta["layers"]["conv_stem"]["w_bits"] == 8


def test_checkpoint_stores_packed_integers_and_is_small(tmp_path):
    model, qmodel, config, _ = _quantized("resnet18", w_bits=4, convention="all")
    save_quantized(qmodel, tmp_path, "resnet18", config, {"input_size": (3, 64, 64)})
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "model.safetensors"))
    packed = stored["layer1.0.conv1.layer.weight.packed"]
    assert packed.dtype == torch.uint8 and packed.numel() == 64 * 64 * 9 // 2
    assert "layer1.0.conv1.layer.weight" not in stored
    ratio = (tmp_path / "model.safetensors").stat().st_size / fp32_weight_bytes(model)
    assert ratio <= 0.16


def test_corrupt_and_mismatched_checkpoints_error_clearly(tmp_path):
    _, qmodel, config, _ = _quantized()
    save_quantized(qmodel, tmp_path, "test_efficientnet", config, {"input_size": (3, 64, 64)})
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_quantized(tmp_path)
    weights.write_bytes(data)
    meta = json.loads((tmp_path / "quant_config.json").read_text())
    (tmp_path / "quant_config.json").write_text(json.dumps({**meta, "model": "test_resnet"}))
    with pytest.raises(CheckpointError, match="does not match"):
        load_quantized(tmp_path)
    (tmp_path / "quant_config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_quantized(tmp_path)
    (tmp_path / "quant_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_quantized(tmp_path)
    with pytest.raises(CheckpointError, match="not a quantized model folder"):
        load_quantized(tmp_path / "missing")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_quantize_save_load_matches(tmp_path):
    model, qmodel, config, x = _quantized(w_bits=4)
    gpu = calibrate(prepare(model.cuda(), config, x[:1].cuda()), [x.cuda()], config)
    save_quantized(gpu, tmp_path, "test_efficientnet", config, {"input_size": (3, 64, 64)})
    loaded = load_quantized(tmp_path, device="cuda")
    with torch.no_grad():
        assert torch.equal(gpu(x.cuda()), loaded(x.cuda()))
        # the same checkpoint on CPU: only float rounding differs (an activation may land on the other grid point)
        assert sqnr_db(loaded(x.cuda()).cpu(), load_quantized(tmp_path)(x)) > 25


def test_biases_added_by_bias_correction_are_saved_and_loaded(tmp_path):
    """Without BatchNorm folding a ResNet's convolutions have no bias; bias correction gives them one."""
    from ptq.config import BiasCorrection
    from ptq.recon.layerwise import Rounding, round_layers

    torch.manual_seed(0)
    model = random_bn_stats(timm.create_model("test_resnet"))
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    config = QuantConfig(w_bits=4, a_bits=8, fold_bn=False, bias_correction=BiasCorrection.EMPIRICAL)
    qmodel = calibrate(prepare(model, config, x[:1]), [x], config)
    assert qmodel.get_submodule("layer1.0.conv1").layer.bias is None
    round_layers(qmodel, [x], Rounding.NEAREST, bias=BiasCorrection.EMPIRICAL)
    assert qmodel.get_submodule("layer1.0.conv1").layer.bias is not None
    save_quantized(qmodel, tmp_path, "test_resnet", config, {"input_size": (3, 64, 64)})
    with torch.no_grad():
        assert torch.equal(qmodel(x), load_quantized(tmp_path)(x))
