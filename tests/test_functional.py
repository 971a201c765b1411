import pytest
import torch

from ptq.quant.functional import dequantize_codes, fake_quantize, qparams_from_range, quantize_codes, round_ste, sqnr_db


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quantized_values_lie_on_the_grid(bits, symmetric):
    x = torch.randn(64, 32) * 3
    scale, zp = qparams_from_range(x.amin(), x.amax(), bits, symmetric)
    xq = fake_quantize(x, scale, zp, bits)
    levels = xq / scale + zp
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.min() >= -1e-4 and levels.max() <= 2**bits - 1 + 1e-4
    assert len(torch.unique(xq)) <= 2**bits
    # the error of an in-range value is at most half a step
    assert (xq - x).abs().max() <= scale / 2 + 1e-5


def test_zero_is_exact_and_range_covers_zero():
    x = torch.tensor([0.3, 0.9, 1.7])  # all positive: the range is widened to include 0
    scale, zp = qparams_from_range(x.amin(), x.amax(), 4, symmetric=False)
    assert fake_quantize(torch.zeros(1), scale, zp, 4).item() == 0.0


def test_symmetric_grid_is_centred():
    scale, zp = qparams_from_range(torch.tensor(-2.0), torch.tensor(1.0), 8, symmetric=True)
    assert zp.item() == 128
    assert torch.isclose(fake_quantize(torch.tensor(2.0), scale, zp, 8), torch.tensor(2.0))
    assert torch.isclose(fake_quantize(torch.tensor(-2.0), scale, zp, 8), torch.tensor(-2.0))


def test_round_ste_passes_gradient_straight_through():
    x = torch.tensor([0.2, 1.6, -2.4], requires_grad=True)
    y = round_ste(x)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.tensor([0.0, 2.0, -2.0]))
    assert torch.equal(x.grad, torch.ones(3))


def test_codes_round_trip_to_fake_quantized_values():
    x = torch.randn(16, 9)
    scale, zp = qparams_from_range(x.amin(1), x.amax(1), 4, False)
    s, z = scale.view(-1, 1), zp.view(-1, 1)
    codes = quantize_codes(x, s, z, 4)
    assert codes.dtype == torch.uint8 and codes.max() <= 15
    assert torch.equal(dequantize_codes(codes, s, z), fake_quantize(x, s, z, 4))


def test_sqnr_grows_about_six_db_per_bit():
    x = torch.randn(10000)
    values = []
    for bits in (4, 6, 8):
        s, z = qparams_from_range(x.amin(), x.amax(), bits, False)
        values.append(sqnr_db(x, fake_quantize(x, s, z, bits)))
    assert 10 < values[1] - values[0] < 14 and 10 < values[2] - values[1] < 14


def _lsq_reference(x, s, z, bits, keep=None):
    """LSQ (arXiv 1902.08153) written out with autograd: clipping decided by x/s itself, straight-through inside."""
    v, qmax = x / s, 2**bits - 1
    inside = ((v + z) >= 0) & ((v + z) <= qmax)
    bound = torch.where(v + z < 0, -z, qmax - z)
    level = torch.where(inside, torch.round(v), bound)
    vs = torch.where(inside, v, bound)
    out = ((level - vs).detach() + vs) * s
    return out if keep is None else torch.where(keep, out, x)


@pytest.mark.parametrize("keep_prob", [None, 0.5])
def test_activation_fake_quantize_matches_lsq_in_values_and_gradients(keep_prob):
    from ptq.quant.functional import act_fake_quantize, keep_mask

    torch.manual_seed(0)
    x = (torch.randn(4, 8, 5, 5) * 3).requires_grad_()
    s, z = torch.tensor([0.1], requires_grad=True), torch.tensor([7.0])
    upstream = torch.randn(4, 8, 5, 5)
    torch.manual_seed(1)
    keep = keep_mask(x, keep_prob) if keep_prob is not None else None
    ref = _lsq_reference(x, s, z, 4, keep)
    gx_ref, gs_ref = torch.autograd.grad((ref * upstream).sum(), (x, s))
    torch.manual_seed(1)  # the same mask inside
    out = act_fake_quantize(x, s, z, 4, keep_prob, grad_factor=0.5)
    gx, gs = torch.autograd.grad((out * upstream).sum(), (x, s))
    assert torch.equal(out, ref)
    assert torch.allclose(gx, gx_ref) and torch.allclose(gs, 0.5 * gs_ref, rtol=1e-5)
    with torch.no_grad():  # the inference path gives the same values
        torch.manual_seed(1)
        assert torch.equal(act_fake_quantize(x, s, z, 4, keep_prob), ref)


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_keep_mask_has_the_asked_probability_and_no_pattern(p):
    from ptq.quant.functional import keep_mask

    torch.manual_seed(0)
    mask = keep_mask(torch.empty(64, 32, 16, 16), p)
    assert mask.dtype == torch.bool and mask.shape == (64, 32, 16, 16)
    assert abs(mask.float().mean().item() - p) < 0.005
    # neighbouring elements (which share a random word when p = 1/2) are uncorrelated, and so are elements a byte
    # or a word apart
    flat = mask.flatten().float()
    for lag in (1, 8, 64):
        assert abs(torch.corrcoef(torch.stack([flat[:-lag], flat[lag:]]))[0, 1].item()) < 0.01
    odd = keep_mask(torch.empty(3, 5, 7), p)  # not a whole number of random words
    assert odd.dtype == torch.bool and odd.shape == (3, 5, 7)


def test_activation_step_gradient_without_an_input_gradient():
    """A unit's first quantizer sees data that needs no gradient: only the step's is computed, and it is LSQ's."""
    from ptq.quant.functional import act_fake_quantize

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4) * 3
    s, z = torch.tensor([0.1], requires_grad=True), torch.tensor([7.0])
    (gs,) = torch.autograd.grad(act_fake_quantize(x, s, z, 4).sum(), s)
    (gs_ref,) = torch.autograd.grad(_lsq_reference(x, s, z, 4).sum(), s)
    assert torch.allclose(gs, gs_ref, rtol=1e-5)


@pytest.mark.parametrize("act", [torch.nn.ReLU6(inplace=True), torch.nn.ReLU()])
@pytest.mark.parametrize("keep_prob", [None, 0.5])
def test_a_relu_taken_into_the_quantizer_gives_the_same_values_and_gradients(act, keep_prob):
    from ptq.quant.modules import ActQuantizer, OutputQuant

    quantizer = ActQuantizer(4)
    quantizer.set_qparams(torch.tensor(0.3), torch.tensor(0.0))
    quantizer.enabled, quantizer.keep_prob = True, keep_prob
    wrapped = OutputQuant(act, quantizer)
    step = quantizer.learn_scale()
    torch.manual_seed(0)
    x = (torch.randn(4, 8, 5, 5) * 4).requires_grad_()
    upstream = torch.randn(4, 8, 5, 5)
    results = []
    for fused in (True, False):
        torch.manual_seed(1)  # the same QDrop mask
        out = wrapped(x.clone()) if fused else quantizer(act(x.clone()))
        results.append((out, *torch.autograd.grad((out * upstream).sum(), (x, step))))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    with torch.no_grad():
        quantizer.enabled = False  # off: the module itself runs
        assert torch.equal(wrapped(x.clone()), act(x.clone()))
