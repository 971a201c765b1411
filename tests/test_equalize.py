"""Cross-layer equalization: same FP function (ReLU6 included), equal ranges, no pair across a residual add, and
checkpoints that reload it."""

import timm
import torch
from conftest import random_bn_stats

from ptq.config import BiasCorrection, QuantConfig
from ptq.export import load_quantized, save_quantized
from ptq.quant import calibrate, prepare
from ptq.quant.equalize import ChannelClamp, _in_range, _out_range, equalize, find_pairs
from ptq.quant.fold import fold_batchnorm
from ptq.recon.layerwise import Rounding, round_layers


def _folded(name, seed=0):
    torch.manual_seed(seed)
    model = random_bn_stats(timm.create_model(name), seed).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    fold_batchnorm(model, x[:1])
    return model, x


def test_equalization_leaves_the_fp_function_unchanged_also_with_relu6():
    for name in ("tf_efficientnet_lite0", "mobilenetv2_050", "test_resnet"):
        model, x = _folded(name)
        with torch.no_grad():
            before = model(x)
            pairs = equalize(model, x[:1])
            after = model(x)
        assert pairs, name
        assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * before.abs().max()), name
        if name != "test_resnet":  # ReLU6 between pointwise and depthwise convolutions: clips moved per channel
            clamps = [m for m in model.modules() if isinstance(m, ChannelClamp)]
            assert clamps and any(not torch.allclose(c.hi, torch.full_like(c.hi, 6.0)) for c in clamps)
        # each pair's two ranges are balanced (a layer in two pairs only approximately: a few sweeps)
        first, second = model.get_submodule(pairs[0].first), model.get_submodule(pairs[0].second)
        assert torch.allclose(_out_range(first), _in_range(second), rtol=0.05)


def test_no_pair_crosses_a_tensor_that_a_residual_add_also_reads():
    """In an inverted-residual block with a skip, the block input is read by its first conv and by the add: scaling
    it would change the add."""
    model, x = _folded("tf_efficientnet_lite0")
    pairs = {(p.first, p.second) for p in find_pairs(model, x[:1])}
    assert ("blocks.1.0.conv_pwl", "blocks.1.1.conv_pw") not in pairs  # blocks.1.1 has a skip
    assert ("blocks.1.0.conv_pw", "blocks.1.0.conv_dw") in pairs
    assert ("blocks.0.0.conv_pw", "blocks.1.0.conv_pw") in pairs  # no skip, no activation in between


def test_equalized_quantized_models_round_trip_through_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = random_bn_stats(timm.create_model("tf_efficientnet_lite0")).eval()
    x = torch.randn(2, 3, 64, 64)
    config = QuantConfig(w_bits=4, a_bits=8, equalize=True, bias_correction=BiasCorrection.EMPIRICAL)
    qmodel = calibrate(prepare(model, config, x[:1]), [x], config)
    round_layers(qmodel, [x], Rounding.NEAREST, bias=BiasCorrection.EMPIRICAL)
    assert any(isinstance(m, ChannelClamp) for m in qmodel.modules())
    save_quantized(qmodel, tmp_path, "tf_efficientnet_lite0", config, {"input_size": (3, 64, 64)})
    loaded = load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(qmodel(x), loaded(x))
    # the FP model with equalization and quantization switched off is still the original network
    fp = prepare(model, QuantConfig(equalize=True, quantize_weights=False, quantize_activations=False), x[:1])
    with torch.no_grad():
        assert torch.allclose(fp(x), model(x), rtol=1e-4, atol=1e-4)
