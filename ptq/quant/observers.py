"""Range observers: they only record statistics; `calculate_qparams` turns the record into a scale and zero point.

- `MinMaxObserver`: the observed minimum and maximum.
- `PercentileObserver`: a low and high percentile of the observed values (robust to outliers).
- `LpObserver`: the clip range α·[min, max] that minimises ||x - Q(x)||_p^p over a grid of α (p = 2.4 by default, as in
  BRECQ arXiv 2102.05426 and QDrop arXiv 2203.05740), searched for all channels at once.

Per-channel observers see the whole tensor (weights); per-tensor observers accumulate min/max exactly and keep a
bounded random sample of values for the percentile and Lp searches (activations over many calibration batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq.config import ObserverKind
from ptq.quant.functional import qparams_from_range


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero point per slice along `axis` (the output channel of a weight)."""

    axis: int = 0


Granularity = PerTensor | PerChannel


class Observer:
    """Records min/max (exact) and a bounded random sample of values, as rows of a (C, K) matrix."""

    def __init__(self, granularity: Granularity = PerTensor(), max_samples: int = 1 << 18, seed: int = 0):
        self.granularity = granularity
        self.max_samples = max_samples
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self._samples: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(seed)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.granularity, PerChannel):
            return x.detach().transpose(0, self.granularity.axis).reshape(x.shape[self.granularity.axis], -1)
        return x.detach().reshape(1, -1)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        rows = self._rows(x).float()
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if rows.shape[1] > self.max_samples:
            idx = torch.randint(rows.shape[1], (self.max_samples,), generator=self._generator).to(rows.device)
            rows = rows[:, idx]
        self._samples.append(rows)
        if sum(s.shape[1] for s in self._samples) > 4 * self.max_samples:
            merged = torch.cat(self._samples, dim=1)
            idx = torch.randperm(merged.shape[1], generator=self._generator)[: 2 * self.max_samples].to(merged.device)
            self._samples = [merged[:, idx]]

    @property
    def samples(self) -> torch.Tensor:
        if not self._samples:
            raise RuntimeError("observer has recorded nothing: run calibration data through the model first")
        merged = torch.cat(self._samples, dim=1) if len(self._samples) > 1 else self._samples[0]
        if merged.shape[1] > self.max_samples:
            idx = torch.randperm(merged.shape[1], generator=self._generator)[: self.max_samples].to(merged.device)
            merged = merged[:, idx]
        self._samples = [merged]
        return merged

    def calculate_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def calculate_qparams(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point, each of shape (C,) (C = 1 per-tensor)."""
        lo, hi = self.calculate_range(bits, symmetric)
        return qparams_from_range(lo, hi, bits, symmetric)


class MinMaxObserver(Observer):
    def calculate_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError("observer has recorded nothing: run calibration data through the model first")
        return self.lo, self.hi


class PercentileObserver(Observer):
    def __init__(self, granularity: Granularity = PerTensor(), percentile: float = 99.99, **kwargs):
        super().__init__(granularity, **kwargs)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def calculate_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.samples
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0], device=x.device)
        lo, hi = torch.quantile(x, q, dim=1)
        return lo, hi


class LpObserver(Observer):
    def __init__(self, granularity: Granularity = PerTensor(), p: float = 2.4, num_candidates: int = 100, **kwargs):
        super().__init__(granularity, **kwargs)
        if p <= 0 or num_candidates < 1:
            raise ValueError(f"Lp search needs p > 0 and num_candidates ≥ 1, got p={p}, {num_candidates}")
        self.p = p
        self.num_candidates = num_candidates

    def calculate_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return lp_search(self.samples, self.lo, self.hi, bits, symmetric, self.p, self.num_candidates)


@torch.no_grad()
def lp_search(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int,
    symmetric: bool,
    p: float = 2.4,
    num_candidates: int = 100,
    max_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x (C, K), the range α·[lo, hi] with α ∈ {1, 1 - 1/n, ..., 1/n} minimising Σ_k |x - Q(x)|^p.

    All rows and a chunk of candidates are evaluated in one broadcast (n_chunk, C, K); no loop over channels.
    """
    alphas = 1.0 - torch.arange(num_candidates, device=x.device, dtype=x.dtype) / num_candidates
    qmax = 2**bits - 1
    chunk = max(1, max_elements // max(1, x.numel()))
    errors = []
    for start in range(0, num_candidates, chunk):
        a = alphas[start : start + chunk].view(-1, 1)  # (n, 1)
        scale, zero_point = qparams_from_range(a * lo, a * hi, bits, symmetric)  # (n, C)
        scale, zero_point = scale.unsqueeze(-1), zero_point.unsqueeze(-1)
        # x̂ - x computed in place: this loop dominates calibration time
        err = x.unsqueeze(0) / scale
        err.round_().add_(zero_point).clamp_(0, qmax).sub_(zero_point).mul_(scale).sub_(x)
        errors.append(err.abs_().pow_(p).sum(dim=-1))  # (n, C)
    best = alphas[torch.cat(errors).argmin(dim=0)]  # (C,)
    return best * lo, best * hi


def make_observer(kind: ObserverKind, granularity: Granularity, **kwargs) -> Observer:
    classes = {
        ObserverKind.MINMAX: MinMaxObserver,
        ObserverKind.PERCENTILE: PercentileObserver,
        ObserverKind.LP: LpObserver,
    }
    return classes[ObserverKind(kind)](granularity, **kwargs)
