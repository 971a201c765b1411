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
        h = (self.v >= 0).float() if self.hard else rectified_sigmoid(self.v)  # σ(V) ≥ 0.5 ⇔ V ≥ 0 ⇔ h ≥ 0.5
        self._last = None if self.hard else (h, self.v._version)  # reused by the regulariser until V changes
        return self._grid(h)

    def regulariser(self, beta: float) -> torch.Tensor:
        """Σ(1 − |2h(V) − 1|^β), reusing h(V) from the forward when V has not changed since (once per step)."""
        last = getattr(self, "_last", None)
        if last is None or last[1] != self.v._version:
            return rounding_regulariser(self.v, beta)
        return (1 - (2 * last[0] - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        return self._grid((self.v >= 0).float())

    @torch.no_grad()
    def channel_scale(self) -> torch.Tensor:
        """The (possibly learned) scale as a per-channel vector, kept positive."""
        return self.scale.detach().flatten().clamp(min=1e-8)
