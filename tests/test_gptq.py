"""Second-order rounding (GPTQ/OBQ) and bias correction: the unfolding, the column-by-column solve, and the
layer-wise pass over a real (tiny) network."""

import itertools
import logging

import pytest
import timm
import torch
from conftest import random_bn_stats
from timm.layers.conv2d_same import Conv2dSame
from torch import nn
from torch.func import functional_call

from ptq.config import BiasCorrection, GptqConfig, QuantConfig
from ptq.export.packing import pack, unpack
from ptq.quant import calibrate, prepare
from ptq.quant.functional import channel_view, quantize_codes
from ptq.quant.modules import quant_layers
from ptq.recon import layerwise
from ptq.recon.gptq import (
    InputStatistics,
    gptq_round,
    grid_quantizer,
    output_error,
    unfold,
    weight_matrix,
)
from ptq.recon.layerwise import Rounding, layer_input, round_layers

LAYERS = {
    "dense 3x3": lambda: nn.Conv2d(8, 16, 3, padding=1),
    "strided grouped": lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),
    "depthwise": lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8),
    "pointwise": lambda: nn.Conv2d(8, 16, 1),
    "timm SAME": lambda: Conv2dSame(8, 16, 3, stride=2),
    "torch same, dilated": lambda: nn.Conv2d(8, 16, 3, padding="same", dilation=2),
    "reflect padding": lambda: nn.Conv2d(8, 16, 3, padding=2, padding_mode="reflect"),
    "1x3 strided": lambda: nn.Conv2d(8, 16, (3, 1), stride=(2, 1), padding=(1, 0)),
}


@pytest.mark.parametrize("kind", LAYERS)
def test_unfolded_columns_reproduce_the_convolution(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    x = torch.randn(3, 8, 11, 13)
    y = layer(x)
    out = torch.bmm(weight_matrix(layer), unfold(layer, x))  # (groups, rows, images·positions)
    out = out.reshape(layer.out_channels, x.shape[0], -1).transpose(0, 1) + layer.bias.view(1, -1, 1)
    assert torch.allclose(out.reshape(y.shape), y, atol=1e-5)


def test_linear_columns_cover_every_token():
    layer = nn.Linear(10, 5)
    x = torch.randn(4, 7, 10)
    out = torch.bmm(weight_matrix(layer), unfold(layer, x))[0].t().reshape(4, 7, 5) + layer.bias
    assert torch.allclose(out, layer(x), atol=1e-6)


def test_statistics_are_the_same_whatever_the_chunking(monkeypatch):
    """Σ x·xᵀ and Σ x are accumulated a few images at a time; the chunk size must not matter."""
    torch.manual_seed(0)
    x = torch.randn(6, 8, 9, 9)
    for make in (LAYERS["depthwise"], LAYERS["pointwise"], LAYERS["timm SAME"]):
        layer = make()
        whole = InputStatistics(layer)
        whole.add(x)
        cols = unfold(layer, x).double()
        assert torch.allclose(whole.xxt, torch.bmm(cols, cols.transpose(1, 2)), rtol=1e-5, atol=1e-4)
        monkeypatch.setattr("ptq.recon.gptq.CHUNK_ELEMENTS", 1)  # one image at a time
        chunked = InputStatistics(layer)
        chunked.add(x)
        monkeypatch.undo()
        assert torch.allclose(chunked.xxt, whole.xxt, rtol=1e-5, atol=1e-4)
        assert torch.allclose(chunked.sum, whole.sum, rtol=1e-5, atol=1e-4) and chunked.count == whole.count


def _problem(d=32, rows=16, seed=0):
    """A layer with correlated inputs (as a conv's neighbouring pixels are) and its per-row 4-bit grid."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g)
    x = mix @ torch.randn(d, 2048, generator=g) * 0.3 + torch.randn(d, 1, generator=g)
    w = torch.randn(1, rows, d, generator=g)
    h = (2 * x @ x.t() / x.shape[1]).double().unsqueeze(0)
    lo, hi = w.amin(-1).reshape(-1), w.amax(-1).reshape(-1)
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    return w, h, scale, zero


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rounding_to_nearest_on_correlated_inputs(act_order):
    w, h, scale, zero = _problem()
    quantize = grid_quantizer(scale, zero, 4, 1, w.shape[1])
    nearest = quantize(w[0].t()).t().unsqueeze(0)
    rounded = gptq_round(w, h, quantize, block_size=8, act_order=act_order)
    assert output_error(w - rounded.weight, h) < 0.7 * output_error(w - nearest, h)
    # every weight lies on its row's grid, and the codes pack and unpack bit-exactly
    s, z = channel_view(scale, 2), channel_view(zero, 2)
    codes = quantize_codes(rounded.weight[0], s, z, 4)
    assert torch.allclose((codes.float() - z) * s, rounded.weight[0], atol=1e-6)
    assert torch.equal(unpack(pack(codes, 4), 4, codes.numel()).reshape(codes.shape), codes)


def test_gptq_is_the_same_with_lazy_blocks_of_any_size():
    w, h, scale, zero = _problem()
    quantize = grid_quantizer(scale, zero, 4, 1, w.shape[1])
    reference = gptq_round(w, h, quantize, block_size=1, act_order=True)
    for block in (3, 8, 128):
        assert torch.equal(gptq_round(w, h, quantize, block_size=block, act_order=True).weight, reference.weight)


def test_each_step_spreads_the_error_as_the_least_squares_optimum_and_a_toy_reaches_the_brute_force_bound():
    """After the first j columns are rounded, GPTQ's remaining (continuous) weights are the exact minimiser of
    ‖WX − W'X‖² with those columns fixed (checked by solving that least-squares problem directly). GPTQ is greedy, so
    on a 4-weight toy its error lies between the best of all 2⁴ grid roundings around W (brute force) and
    round-to-nearest."""
    w, h, scale, zero = _problem(d=4, rows=1, seed=3)
    quantize = grid_quantizer(scale, zero, 4, 1, 1)
    rounded = gptq_round(w, h, quantize, block_size=2, act_order=False, damp=1e-12)
    hh = h[0]
    for j in range(1, 4):
        fixed, free = slice(0, j), slice(j, 4)
        # minimise over v: (δ)ᵀH(δ) with δ = [w_fixed − q_fixed, w_free − v]  →  v = w_free + H_ff⁻¹ H_fx (w_x − q_x)
        dx = (w[0, 0, fixed] - rounded.weight[0, 0, fixed]).double()
        optimum = w[0, 0, free].double() + torch.linalg.solve(hh[free, free], hh[free, fixed] @ dx)
        assert torch.allclose(rounded.continuous[0, 0, j].double(), optimum[0], atol=1e-5)
    s, z = float(scale[0]), float(zero[0])
    floor = torch.floor(w[0, 0] / s)
    best = min(
        output_error((w[0, 0] - (floor + torch.tensor(c)) * s).view(1, 1, 4), h)
        for c in itertools.product([0.0, 1.0], repeat=4)
        if all(0 <= f + ci + z <= 15 for f, ci in zip(floor.tolist(), c, strict=True))
    )
    nearest = output_error(w - quantize(w[0].t()).t().unsqueeze(0), h)
    assert best - 1e-9 <= output_error(w - rounded.weight, h) <= nearest + 1e-9


def test_batched_depthwise_equals_one_channel_at_a_time():
    torch.manual_seed(0)
    layer = LAYERS["depthwise"]()
    stats = InputStatistics(layer)
    stats.add(torch.randn(4, 8, 12, 12) * torch.linspace(0.2, 2, 8).view(1, -1, 1, 1))
    w = weight_matrix(layer).detach()  # (8 groups, 1 row, 9)
    scale = w.abs().amax((1, 2)) / 7
    zero = torch.full((8,), 8.0)
    batched = gptq_round(w, stats.hessian, grid_quantizer(scale, zero, 4, 8, 1), act_order=True)
    for c in range(8):
        one = gptq_round(w[c : c + 1], stats.hessian[c : c + 1], grid_quantizer(scale[c], zero[c], 4, 1, 1))
        assert torch.equal(one.weight, batched.weight[c : c + 1])


def test_dead_inputs_and_a_zero_hessian_stay_finite():
    w, h, scale, zero = _problem(d=8, rows=4)
    h[0, 2, :] = h[0, :, 2] = 0  # an input that never fires
    quantize = grid_quantizer(scale, zero, 4, 1, 4)
    out = gptq_round(w, h, quantize)
    assert torch.isfinite(out.weight).all()
    assert torch.equal(out.weight[..., 2], quantize(w[..., 2]))  # unconstrained: rounded to nearest
    zero_h = gptq_round(w, torch.zeros_like(h), quantize)  # no data at all: everything to nearest
    assert torch.equal(zero_h.weight, quantize(w[0].t()).t().unsqueeze(0))


def _tiny(name="test_efficientnet", w_bits=3, a_bits=8, seed=0):
    torch.manual_seed(seed)
    model = random_bn_stats(timm.create_model(name, num_classes=10), seed)
    x = torch.randn(24, 3, 32, 32)
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits)
    qmodel = calibrate(prepare(model, config, x[:1]), [x], config)
    return model, qmodel, [x[:12], x[12:]]


def _inputs_and_outputs(qmodel, batches):
    """Each layer's input (as its weight sees it) in the model as it is now."""
    seen = {}
    layers = quant_layers(qmodel)

    def hook(name):
        return lambda m, a: seen.setdefault(name, []).append(layer_input(m, a[0]).detach())

    handles = [layer.register_forward_pre_hook(hook(n)) for n, layer in layers.items()]
    with torch.no_grad():
        for x in batches:
            qmodel(x)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_bias_correction_zeroes_the_mean_output_shift_on_the_calibration_data():
    _, qmodel, batches = _tiny()
    fp = {n: (layer.layer.weight.detach().clone(), layer.layer.bias.detach().clone())
          for n, layer in quant_layers(qmodel).items()}  # fmt: skip
    inputs_before = _inputs_and_outputs(qmodel, batches)
    summary, _ = round_layers(qmodel, batches, Rounding.NEAREST, bias=BiasCorrection.EMPIRICAL)
    assert summary["layers"] == len(fp)
    inputs = _inputs_and_outputs(qmodel, batches)
    shifted = 0
    for name, layer in quant_layers(qmodel).items():
        inner = layer.layer
        x = inputs[name]
        w, b = fp[name]
        with torch.no_grad():
            fp_out = functional_call(inner, {"weight": w, "bias": b}, (x,))
            q_out = functional_call(inner, {"weight": layer.weight_quantizer(w), "bias": inner.bias}, (x,))
            q_uncorrected = q_out - (inner.bias - b).view(1, -1, *([1] * (q_out.dim() - 2)))
        dims = [d for d in range(q_out.dim()) if d != 1]
        assert torch.allclose(q_out.mean(dims), fp_out.mean(dims), atol=1e-4), name
        shifted += float((q_uncorrected.mean(dims) - fp_out.mean(dims)).abs().max() > 1e-3)
        # the weights stay FP for round-to-nearest: the quantizer rounds them at every forward
        assert torch.equal(inner.weight, w)
    assert shifted > len(fp) / 2  # there was a shift to take back
    assert not all(torch.equal(inputs[n], inputs_before[n]) for n in inputs)  # corrected layers feed later ones


def test_gptq_pass_lowers_each_layers_error_and_keeps_codes_on_the_grid():
    _, qmodel, batches = _tiny()
    summary, starts = round_layers(qmodel, batches, Rounding.GPTQ, GptqConfig(), BiasCorrection.EMPIRICAL)
    rows = summary["per_layer"]
    assert all(r["rounding"] == "gptq" for r in rows)
    assert sum(r["error"] for r in rows) < 0.8 * sum(r["rtn_error"] for r in rows)
    for name, layer in quant_layers(qmodel).items():
        q = layer.weight_quantizer
        w = layer.weight
        s, z = channel_view(q.scale, w.dim()), channel_view(q.zero_point, w.dim())
        assert torch.equal(q(w), w) or torch.allclose(q(w), w, atol=1e-6), name  # a fixed point of the quantizer
        assert starts[name].shape == w.shape
        codes = quantize_codes(w, s, z, q.bits)
        assert torch.allclose((codes.float() - z) * s, w, atol=1e-6)


def test_a_layer_whose_hessian_cannot_be_inverted_falls_back_to_nearest_with_a_warning(monkeypatch, caplog):
    _, qmodel, batches = _tiny()
    original, calls = layerwise.gptq_round, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise layerwise.SingularHessian("not positive definite")
        return original(*args, **kw)

    monkeypatch.setattr(layerwise, "gptq_round", failing)
    with caplog.at_level(logging.WARNING):
        summary, _ = round_layers(qmodel, batches, Rounding.GPTQ)
    rows = summary["per_layer"]
    assert [r["rounding"] for r in rows].count("nearest (fallback)") == 1
    assert rows[3]["rounding"] == "nearest (fallback)" and rows[3]["name"] in caplog.text
    assert all(torch.isfinite(p).all() for p in qmodel.parameters())


def test_warm_started_reconstruction_with_zero_iterations_is_the_gptq_model():
    from ptq.recon import find_units
    from ptq.recon.engine import collect, fp_reference, reconstruct_unit

    _, qmodel, batches = _tiny(w_bits=4)
    reference = fp_reference(qmodel)
    _, starts = round_layers(qmodel, batches, Rounding.GPTQ, bias=BiasCorrection.EMPIRICAL)
    gptq = {n: (layer.weight.detach().clone(), layer.layer.bias.detach().clone())
            for n, layer in quant_layers(qmodel).items()}  # fmt: skip
    for unit in find_units(qmodel, batches[0][:1]):
        data = collect(qmodel, unit, batches, reference=reference)
        reconstruct_unit(qmodel, unit, data, start=starts, iters=0, keep_prob=0.5)
    for name, layer in quant_layers(qmodel).items():
        assert torch.equal(layer.weight, gptq[name][0]), name
        assert torch.equal(layer.layer.bias, gptq[name][1]), name
    # without the start, zero iterations give round-to-nearest of the FP weights instead
    _, cold, _ = _tiny(w_bits=4)
    for unit in find_units(cold, batches[0][:1]):
        reconstruct_unit(cold, unit, collect(cold, unit, batches), iters=0)
    assert any(not torch.equal(cold.get_submodule(n).weight, w) for n, (w, _) in gptq.items())


def test_analytic_means_are_the_gaussian_moments_after_the_activation(caplog):
    from ptq.recon.analytic import analytic_input_means, gaussian_mean

    mean, std = torch.tensor([-1.0, 0.0, 0.5, 3.0]), torch.tensor([0.5, 1.0, 2.0, 1.5])
    normal = torch.distributions.Normal(0.0, 1.0)
    a = mean / std
    relu = std * normal.log_prob(a).exp() + mean * normal.cdf(a)  # E[max(z, 0)] in closed form
    assert torch.allclose(gaussian_mean(nn.ReLU(), mean, std).float(), relu, atol=1e-5)
    # a ResNet: the second conv of a block reads ReLU(BN(first conv)), the first conv a residual sum (no mean)
    model, qmodel, batches = _tiny("test_resnet", w_bits=8)
    with caplog.at_level(logging.WARNING):
        means = analytic_input_means(qmodel, model, batches[0][:1])
        with torch.no_grad():
            qmodel(batches[0])  # compiled kernels still compile after the probe's torch-function mode
    assert "could not compile" not in caplog.text
    layers = quant_layers(qmodel)
    assert {n for n in layers if n.endswith(".conv2")} <= set(means)
    assert not {n for n in layers if n.endswith(".conv1") and not n.startswith("layer1.0")} & set(means)
    for name, mu in means.items():
        assert mu.shape == weight_matrix(layers[name].layer).shape[::2] and torch.isfinite(mu).all()
        assert (mu >= 0).all()  # after a ReLU


def test_a_layer_kind_gptq_cannot_express_is_rounded_to_nearest_and_reported_once(caplog):
    """A convolution subclass that changes its weight in forward (weight standardisation) is not y = W·x + b."""
    from timm.layers import StdConv2d

    from ptq.quant.fold import replace_module

    torch.manual_seed(0)
    model = random_bn_stats(timm.create_model("test_resnet", num_classes=10))
    old = model.layer1[0].conv2
    replace_module(model, "layer1.0.conv2", StdConv2d(old.in_channels, old.out_channels, 3, padding=1, bias=False))
    x = torch.randn(16, 3, 32, 32)
    config = QuantConfig(w_bits=4, a_bits=8)
    qmodel = calibrate(prepare(model.eval(), config, x[:1]), [x], config)
    before = qmodel.get_submodule("layer1.0.conv2").weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        summary, _ = round_layers(qmodel, [x[:8], x[8:]], Rounding.GPTQ, bias=BiasCorrection.EMPIRICAL)
    warnings = [r for r in caplog.records if "cannot express" in r.getMessage()]
    assert len(warnings) == 1 and "layer1.0.conv2" in warnings[0].getMessage()
    assert summary["unsupported"] == ["layer1.0.conv2"]
    assert "layer1.0.conv2" not in {r["name"] for r in summary["per_layer"]}
    assert torch.equal(qmodel.get_submodule("layer1.0.conv2").weight, before)  # left to the quantizer: nearest
