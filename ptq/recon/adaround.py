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

from ptq._fuse import fused
from ptq.quant.functional import channel_view, qrange

ZETA, GAMMA = 1.1, -0.1


def init_rounding(w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """⌊W/s⌋ and V such that h(V) = W/s − ⌊W/s⌋."""
    scaled = w / scale
    floor = torch.floor(scaled)
    frac = (scaled - floor).clamp(1e-4, 1 - 1e-4)
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return floor, torch.log(p / (1 - p))


def _soft_rounding(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h(V) and ∂h/∂V = (ζ − γ)·σ(V)(1 − σ(V)) where the rectification does not clip (0 ≤ h ≤ 1 inclusive, as
    `torch.clamp`'s gradient), else 0."""
    sig = torch.sigmoid(v)
    h = sig * (ZETA - GAMMA) + GAMMA
    dh = ((h >= 0) & (h <= 1)) * (sig * (1 - sig) * (ZETA - GAMMA))
    return h.clamp(0, 1), dh


@fused
def _soft_weight(v, floor, scale, zero_point, qmin, qmax, beta, learn_scale: bool):
    """Ŵ(V) over (channels, weights per channel) and what its backward needs, in one pass: ∂Ŵ/∂V; for a learned
    scale the grid level clamp(⌊W/s⌋ + h + z) − z; and with `beta`, for the regulariser R = Σ(1 − |2h − 1|^β),
    the per-row sums of |2h − 1|^β and ∂R/∂V = −2β|2h − 1|^(β−1)·sign(2h − 1)·∂h/∂V, which share h and ∂h/∂V.
    The code range [qmin, qmax] and β come as 0-d tensors (integer arguments would be symbolic in the compiled
    kernel, which then runs slower)."""
    h, dh = _soft_rounding(v)
    level = floor + h + zero_point
    on_grid = (level >= qmin) & (level <= qmax)
    coded = level.clamp(qmin, qmax) - zero_point
    step = scale.clamp(min=1e-8)
    decided = d_reg = None
    if beta is not None:
        t = 2 * h - 1
        a = t.abs()
        # one power serves the value (a^β = a^(β−1)·a) and the gradient; as exp(log): half the time of a compiled
        # pow with a tensor exponent (a = 0 gives 0 for β > 1, and 0^0 = 1 as pow has it)
        a_pow = torch.exp(torch.log(a.clamp(min=1e-30)) * (beta - 1))
        decided = (a * a_pow).sum(1)  # per row: a reduction over the whole tensor would split the kernel
        d_reg = a_pow * torch.sign(t) * dh * (-2 * beta)
    return coded * step, on_grid * dh * step, coded if learn_scale else None, decided, d_reg


@fused
def _rounding_grad(grad, d_weight, grad_reg, d_reg):
    """∂L/∂V = ∂L/∂Ŵ·∂Ŵ/∂V + ∂L/∂R·∂R/∂V in one pass."""
    return grad * d_weight + grad_reg * d_reg


class _SoftWeight(torch.autograd.Function):
    """(Ŵ(V), R(V) or 0) as one autograd node that keeps ∂Ŵ/∂V (and ∂R/∂V) as single tensors instead of every
    intermediate (AdaRound's per-weight work dominates units with many weights and small activations):
    ∂Ŵ/∂V = s·1[qmin ≤ ⌊W/s⌋ + h + z ≤ qmax]·∂h/∂V and, for a learned scale (Genie-M), ∂Ŵ/∂s = clamp(⌊W/s⌋ + h + z) − z
    summed per channel. Works on (channels, weights per channel) views, so one compiled kernel serves every layer."""

    @staticmethod
    def forward(ctx, v, floor, scale, zero_point, qmin, qmax, beta):
        rows = v.shape[0]
        learn = ctx.needs_input_grad[2]
        w, dw, coded, decided, d_reg = _soft_weight(
            v.reshape(rows, -1), floor.reshape(rows, -1), scale.reshape(-1, 1), zero_point.reshape(-1, 1),
            v.new_full((), qmin), v.new_full((), qmax), None if beta is None else v.new_full((), beta), learn,
        )  # fmt: skip
        ctx.save_for_backward(dw, coded, scale if learn else None, d_reg)
        return w.view(v.shape), v.new_zeros(()) if decided is None else v.numel() - decided.sum()

    @staticmethod
    def backward(ctx, grad, grad_reg):
        dw, coded, scale, d_reg = ctx.saved_tensors
        flat = grad.reshape(dw.shape)
        grad_v = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_v = (flat * dw if d_reg is None else _rounding_grad(flat, dw, grad_reg, d_reg)).view(grad.shape)
        if coded is not None:
            grad_s = (flat * coded).sum(1).reshape(scale.shape) * (scale >= 1e-8)
        return grad_v, None, grad_s, None, None, None, None


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
        self.beta: float | None = None  # the regulariser's β for the next forward; None: no regulariser
        self.penalty: torch.Tensor | None = None  # the regulariser as computed by the last forward

    def _grid(self, h: torch.Tensor) -> torch.Tensor:
        qmin, qmax = qrange(self.bits)
        level = torch.clamp(self.floor + h + self.zero_point, qmin, qmax) - self.zero_point
        return level * self.scale.clamp(min=1e-8)

    def forward(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """The soft weight Ŵ(V) (the hard one after `hard` is set). With `beta` set, the regulariser at that β is
        computed in the same pass and left in `penalty`."""
        if self.hard:
            return self._grid((self.v >= 0).float())  # σ(V) ≥ 0.5 ⇔ V ≥ 0 ⇔ h ≥ 0.5
        qmin, qmax = qrange(self.bits)
        soft, reg = _SoftWeight.apply(self.v, self.floor, self.scale, self.zero_point, qmin, qmax, self.beta)
        self.penalty = None if self.beta is None else reg
        return soft

    def regulariser(self, beta: float) -> torch.Tensor:
        """Σ(1 − |2h(V) − 1|^β) on its own (the forward computes it alongside the weight when `beta` is set)."""
        qmin, qmax = qrange(self.bits)
        return _SoftWeight.apply(self.v, self.floor, self.scale, self.zero_point, qmin, qmax, beta)[1]

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        return self._grid((self.v >= 0).float())

    @torch.no_grad()
    def channel_scale(self) -> torch.Tensor:
        """The (possibly learned) scale as a per-channel vector, kept positive."""
        return self.scale.detach().flatten().clamp(min=1e-8)
