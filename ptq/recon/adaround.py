"""AdaRound (arXiv 2004.10568): learn, per weight, whether to round down or up.

    Ŵ = s · (clamp(⌊W/s⌋ + h(V) + z, 0, 2^b − 1) − z),   h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1

V starts where h(V) equals the fractional part of W/s (so the soft weight starts at W). The regulariser
λ·Σ(1 − |2h(V) − 1|^β), with β annealed linearly 20 → 2 after a warm-up without it, pushes every h to 0 or 1; at the
end rounding is made hard (h ≥ 0.5 → up). The hard result is written back as the layer's weight, exactly on the
quantizer's grid, so packing and the ordinary fake-quantized forward reproduce it bit for bit.

Genie-M (arXiv 2212.04780) also learns the per-channel scale s jointly with V (`learn_scale=True`), with ⌊W/s₀⌋
frozen at its initial value; the learned s then becomes the weight quantizer's scale.
"""

from __future__ import annotations

import torch
from torch import nn

from ptq.quant.functional import channel_view, qrange

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def init_rounding(w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """⌊W/s⌋ and V such that h(V) = W/s − ⌊W/s⌋."""
    scaled = w / scale
    floor = torch.floor(scaled)
    frac = (scaled - floor).clamp(1e-4, 1 - 1e-4)
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return floor, torch.log(p / (1 - p))


def rounding_regulariser(v: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ(1 − |2h(V) − 1|^β): zero once every h(V) is 0 or 1."""
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


def _soft_rounding(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h(V) and ∂h/∂V = (ζ − γ)·σ(V)(1 − σ(V)) where the rectification does not clip (0 ≤ h ≤ 1 inclusive, as
    `torch.clamp`'s gradient), else 0."""
    sig = torch.sigmoid(v)
    h = sig * (ZETA - GAMMA) + GAMMA
    dh = (h >= 0).logical_and_(h <= 1).to(v.dtype).mul_(sig).mul_(1 - sig).mul_(ZETA - GAMMA)
    return h.clamp_(0, 1), dh


class _SoftWeight(torch.autograd.Function):
    """Ŵ(V) as one autograd node that keeps ∂Ŵ/∂V as a single tensor instead of every intermediate (AdaRound's
    per-weight work dominates units with many weights and small activations):
    ∂Ŵ/∂V = s·1[qmin ≤ ⌊W/s⌋ + h + z ≤ qmax]·∂h/∂V and, for a learned scale (Genie-M), ∂Ŵ/∂s = clamp(⌊W/s⌋ + h + z) − z
    summed per channel. Also returns h(V) and ∂h/∂V (not differentiable) for the regulariser."""

    @staticmethod
    def forward(ctx, v, floor, scale, zero_point, qmin, qmax):
        h, dh = _soft_rounding(v)
        level = floor + h + zero_point
        on_grid = (level >= qmin).logical_and_(level <= qmax)
        coded = level.clamp_(qmin, qmax).sub_(zero_point)
        step = scale.clamp(min=1e-8)
        w = coded * step
        dw = on_grid.to(v.dtype).mul_(dh).mul_(step)
        learn = ctx.needs_input_grad[2]
        ctx.save_for_backward(dw, coded if learn else None, scale if learn else None)
        ctx.mark_non_differentiable(h, dh)
        return w, h, dh

    @staticmethod
    def backward(ctx, grad, _h, _dh):
        dw, coded, scale = ctx.saved_tensors
        grad_v = grad * dw if ctx.needs_input_grad[0] else None
        grad_s = None
        if coded is not None:
            grad_s = (grad * coded).sum_to_size(scale.shape) * (scale >= 1e-8)
        return grad_v, None, grad_s, None, None, None


class _Regulariser(torch.autograd.Function):
    """R = Σ(1 − |2h − 1|^β) from h(V) and ∂h/∂V, keeping ∂R/∂V = −2β|2h − 1|^(β−1)·sign(2h − 1)·∂h/∂V only."""

    @staticmethod
    def forward(ctx, v, h, dh, beta):
        t = 2 * h - 1
        a = t.abs()
        a_pow = a.pow(beta - 1)  # one pow serves the value (a^β = a^(β−1)·a) and the gradient
        ctx.save_for_backward(a_pow.mul(t.sign_()).mul_(dh).mul_(-2 * beta))
        return a.numel() - a.mul_(a_pow).sum()

    @staticmethod
    def backward(ctx, grad):
        (dr,) = ctx.saved_tensors
        return grad * dr, None, None, None


def beta_at(step: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """β for `step` of `total`: None (no regulariser) during the warm-up, then linear from `start` to `end`."""
    first = int(warmup * total)
    if step < first:
        return None
    return start + (end - start) * (step - first) / max(1, total - first)


class AdaRoundQuantizer(nn.Module):
    """Replaces a layer's weight quantizer during reconstruction; `hard_weight()` gives the final weight."""

    def __init__(
        self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, learn_scale: bool = False
    ):
        super().__init__()
        self.bits = bits
        s, z = channel_view(scale, weight.ndim), channel_view(zero_point, weight.ndim)
        floor, v = init_rounding(weight.detach(), s)
        self.register_buffer("floor", floor)
        if learn_scale:
            self.scale = nn.Parameter(s.detach().clone())
        else:
            self.register_buffer("scale", s.detach().clone())
        self.register_buffer("zero_point", z.detach().clone())
        self.v = nn.Parameter(v)
        self.hard = False

    def _grid(self, h: torch.Tensor) -> torch.Tensor:
        qmin, qmax = qrange(self.bits)
        level = torch.clamp(self.floor + h + self.zero_point, qmin, qmax) - self.zero_point
        return level * self.scale.clamp(min=1e-8)

    def forward(self, w: torch.Tensor | None = None) -> torch.Tensor:
        if self.hard:
            self._last = None
            return self._grid((self.v >= 0).float())  # σ(V) ≥ 0.5 ⇔ V ≥ 0 ⇔ h ≥ 0.5
        qmin, qmax = qrange(self.bits)
        w, h, dh = _SoftWeight.apply(self.v, self.floor, self.scale, self.zero_point, qmin, qmax)
        self._last = (h, dh, self.v._version)  # reused by the regulariser until V changes
        return w

    def regulariser(self, beta: float) -> torch.Tensor:
        """Σ(1 − |2h(V) − 1|^β), reusing h(V) from the forward when V has not changed since (once per step)."""
        last = getattr(self, "_last", None)
        if last is None or last[2] != self.v._version:
            with torch.no_grad():
                h, dh = _soft_rounding(self.v)
        else:
            h, dh = last[0], last[1]
        return _Regulariser.apply(self.v, h, dh, beta)

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        return self._grid((self.v >= 0).float())

    @torch.no_grad()
    def channel_scale(self) -> torch.Tensor:
        """The (possibly learned) scale as a per-channel vector, kept positive."""
        return self.scale.detach().flatten().clamp(min=1e-8)
