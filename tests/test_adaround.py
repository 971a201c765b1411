import pytest
import torch

from ptq.export.packing import pack, unpack
from ptq.quant.functional import channel_view, fake_quantize, qparams_from_range, quantize_codes
from ptq.recon.adaround import GAMMA, ZETA, AdaRoundQuantizer, beta_at


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) of AdaRound, written out here to check the fused kernels against."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _setup(bits=4):
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    scale, zp = qparams_from_range(w.flatten(1).amin(1), w.flatten(1).amax(1), bits, False)
    return w, scale, zp


def test_soft_weight_starts_at_w_and_hard_rounding_starts_at_rtn():
    w, scale, zp = _setup()
    q = AdaRoundQuantizer(w, scale, zp, 4)
    s, z = channel_view(scale, 4), channel_view(zp, 4)
    representable = torch.maximum(torch.minimum(w, (15 - z) * s), -z * s)  # the grid's ends clip, as in RTN
    assert torch.allclose(q(), representable, atol=1e-3)
    rtn = fake_quantize(w, channel_view(scale, 4), channel_view(zp, 4), 4)
    assert torch.allclose(q.hard_weight(), rtn, atol=1e-6)


def test_hard_weights_lie_on_the_grid_and_pack_exactly():
    w, scale, zp = _setup(bits=3)
    q = AdaRoundQuantizer(w, scale, zp, 3)
    with torch.no_grad():
        q.v.copy_(torch.randn_like(q.v) * 3)  # as if learned: some weights now round the other way
    hard = q.hard_weight()
    s, z = channel_view(scale, 4), channel_view(zp, 4)
    assert torch.equal(fake_quantize(hard, s, z, 3), hard)  # re-quantizing changes nothing
    codes = quantize_codes(hard, s, z, 3)
    assert torch.equal(unpack(pack(codes, 3), 3, codes.numel()).view_as(codes), codes)
    assert torch.allclose((codes.float() - z) * s, hard)
    assert not torch.equal(hard, fake_quantize(w, s, z, 3))


def test_gradient_reaches_the_rounding_variables_and_regulariser_vanishes_when_decided():
    w, scale, zp = _setup()
    q = AdaRoundQuantizer(w, scale, zp, 4)
    (q() - w * 1.1).square().sum().backward()
    assert q.v.grad is not None and q.v.grad.abs().sum() > 0
    with torch.no_grad():
        q.v.copy_(torch.sign(q.v) * 20)
    assert q.regulariser(2.0) < 1e-3
    assert torch.all((rectified_sigmoid(q.v) == 0) | (rectified_sigmoid(q.v) == 1))


def test_beta_schedule_warms_up_then_anneals():
    assert beta_at(0, 100) is None and beta_at(19, 100) is None
    assert beta_at(20, 100) == 20.0
    assert abs(beta_at(99, 100) - 2.0) < 0.3


@pytest.mark.parametrize("compiled", ["1", "0"])
@pytest.mark.parametrize("learn_scale", [False, True])
def test_fused_soft_weight_and_regulariser_match_the_formulas_and_their_autograd(learn_scale, compiled, monkeypatch):
    """Values and gradients (V and, for Genie-M, the scale) of the hand-written backward equal autograd's through
    the plain formulas, clipped h and clipped grid levels included; compiled into one kernel or op by op."""
    monkeypatch.setenv("PTQ_COMPILE", compiled)
    from ptq.quant.functional import qrange

    def rounding_regulariser(v, beta):  # Σ(1 − |2h(V) − 1|^β), the plain formula
        return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()

    w, scale, zp = _setup(bits=3)
    q = AdaRoundQuantizer(w, scale, zp, 3, learn_scale=learn_scale)
    with torch.no_grad():
        q.v.copy_(torch.randn_like(q.v) * 4)  # many h clipped at 0 or 1, some levels pushed off the grid
    g = torch.randn_like(w)
    qmin, qmax = qrange(3)

    def reference():
        level = torch.clamp(q.floor + rectified_sigmoid(q.v) + q.zero_point, qmin, qmax) - q.zero_point
        return level * q.scale.clamp(min=1e-8), rounding_regulariser(q.v, 7.0)

    params = [q.v] + ([q.scale] if learn_scale else [])
    w_ref, r_ref = reference()
    want = torch.autograd.grad((w_ref * g).sum() + 0.3 * r_ref, params)
    w_new = q()
    r_new = q.regulariser(7.0)
    got = torch.autograd.grad((w_new * g).sum() + 0.3 * r_new, params)
    assert torch.allclose(w_new, w_ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(r_new, r_ref, rtol=1e-6)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    q.beta = 7.0  # the regulariser computed in the weight's own pass, as during reconstruction
    w_one = q()
    assert torch.equal(w_one, w_new) and torch.allclose(q.penalty, r_ref, rtol=1e-6)
    for a, b in zip(torch.autograd.grad((w_one * g).sum() + 0.3 * q.penalty, params), want, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
