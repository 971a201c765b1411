"""Bits per layer by exact integer linear programming (LCPAQ / HAWQ-v2), solved by scipy's `milp`.

With x_{i,b} ∈ {0, 1} meaning "layer i gets b bits":

    minimise   Σ_{i,b} Ω_i(b) x_{i,b}
    subject to Σ_b x_{i,b} = 1                                   (one width per layer, among its allowed widths)
               Σ_{i,b} bytes_i(b) x_{i,b} ≤ size budget          (packed weights + per-channel scale and zero point)
               Σ_{i,b} n_i b x_{i,b} ≤ avg_bits · Σ_i n_i        (or: an average-bits budget)
               Σ_{i,b} MACs_i b a_i x_{i,b} ≤ BOPs budget        (optional)

All constraint coefficients are integers, so a binary solution that the solver accepts meets each budget exactly.
The optimal points over a sweep of size budgets form the Pareto front of (size, predicted loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from ptq.config import HIGH_BITS, MixedConfig, parse_count, parse_size
from ptq.errors import PtqError
from ptq.mixed.sensitivity import LayerSensitivity, SensitivityTable
from ptq.quant.modules import quant_layers


class AllocationError(PtqError, ValueError):
    """No allocation meets the budget; the message names the smallest feasible one."""


@dataclass(frozen=True)
class Budget:
    size_bytes: int | None = None
    avg_bits: float | None = None
    bops: int | None = None

    def __post_init__(self):
        if self.size_bytes is None and self.avg_bits is None and self.bops is None:
            raise AllocationError("mixed precision needs a budget: --size-budget (e.g. 2.5MB) or --avg-bits (e.g. 3.5)")

    @classmethod
    def from_config(cls, config: MixedConfig) -> Budget:
        return cls(parse_size(config.size_budget), config.avg_bits, parse_count(config.bops_budget))

    def to_dict(self) -> dict:
        return {"size_bytes": self.size_bytes, "avg_bits": self.avg_bits, "bops": self.bops}


@dataclass
class Allocation:
    bits: dict[str, int]
    weight_bytes: int
    avg_bits: float
    bops: int
    predicted_kl: float  # ½ Σ Ω_i(b_i): second-order prediction of the KL the quantized weights add

    def to_dict(self) -> dict:
        return {
            "weight_bytes": self.weight_bytes,
            "avg_bits": round(self.avg_bits, 4),
            "bops": self.bops,
            "predicted_kl": self.predicted_kl,
            "bits": self.bits,
        }


def evaluate(table: SensitivityTable, bits: dict[str, int]) -> Allocation:
    """Size, average bits, BOPs and predicted KL of a given allocation."""
    layers = table.layers
    numel = sum(layer.numel for layer in layers)
    return Allocation(
        bits=dict(bits),
        weight_bytes=sum(layer.weight_bytes(bits[layer.name]) for layer in layers),
        avg_bits=sum(layer.numel * bits[layer.name] for layer in layers) / numel,
        bops=sum(layer.bops(bits[layer.name]) for layer in layers),
        predicted_kl=0.5 * sum(layer.omega(bits[layer.name]) for layer in layers),
    )


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.4g} MB" if n >= 1e5 else f"{n / 1e3:.4g} KB"


def _reachable(layers: list[LayerSensitivity], cost, pick=min) -> float:
    """Σ over layers of the smallest (or, with `pick=max`, largest) `cost(layer, b)` among its allowed widths."""
    return sum(pick(cost(layer, b) for b in layer.allowed) for layer in layers)


def check_feasible(layers: list[LayerSensitivity], budget: Budget) -> None:
    """Raise `AllocationError` naming the smallest feasible budget when one budget alone cannot be met (needs only
    the layers' sizes and allowed widths, so it runs before any sensitivity is measured)."""
    widths = sorted({b for layer in layers for b in layer.allowed})
    fixed = [layer.name for layer in layers if layer.allowed == [HIGH_BITS] and len(widths) > 1]
    limits = f"widths {widths}" + (f" ({', '.join(fixed)} fixed at {HIGH_BITS} bits)" if fixed else "")
    if budget.size_bytes is not None:
        least = _reachable(layers, LayerSensitivity.weight_bytes)
        if budget.size_bytes < least:
            raise AllocationError(
                f"size budget {_fmt_bytes(budget.size_bytes)} is below the smallest weight size reachable with "
                f"{limits}: {_fmt_bytes(least)} ({least} bytes); raise --size-budget to at least that"
            )
    if budget.avg_bits is not None:
        numel = sum(layer.numel for layer in layers)
        least = _reachable(layers, lambda layer, b: layer.numel * b) / numel
        if budget.avg_bits < least - 1e-12:
            raise AllocationError(
                f"--avg-bits {budget.avg_bits:g} is below the smallest average reachable with {limits}: "
                f"{math.ceil(least * 1e4) / 1e4:.4f}; raise --avg-bits to at least that"
            )
    if budget.bops is not None:
        least = _reachable(layers, LayerSensitivity.bops)
        if budget.bops < least:
            raise AllocationError(
                f"BOPs budget {budget.bops / 1e9:.4g}G is below the smallest reachable with {limits}: "
                f"{least / 1e9:.4g}G; raise --bops-budget to at least that"
            )


def allocate(table: SensitivityTable, budget: Budget) -> Allocation:
    """The allocation of least total sensitivity within `budget` (exact: the MILP is solved to a zero gap)."""
    check_feasible(table.layers, budget)
    layers = table.layers
    columns = [(i, b) for i, layer in enumerate(layers) for b in layer.allowed]
    n = len(columns)
    omega = np.array([layers[i].omega(b) for i, b in columns], dtype=np.float64)
    scale = omega.max() if omega.size and omega.max() > 0 else 1.0
    cost = omega / scale
    # ties (equal sensitivity) go to the smaller width: a tiny size term keeps the choice deterministic
    size = np.array([layers[i].weight_bytes(b) for i, b in columns], dtype=np.float64)
    cost += 1e-9 * size / size.max()
    one_each = np.zeros((len(layers), n))
    for j, (i, _) in enumerate(columns):
        one_each[i, j] = 1.0
    constraints = [LinearConstraint(one_each, 1, 1)]
    if budget.size_bytes is not None:
        constraints.append(LinearConstraint(size[None, :], -np.inf, budget.size_bytes))
    if budget.avg_bits is not None:
        total = sum(layer.numel for layer in layers)
        code_bits = np.array([layers[i].numel * b for i, b in columns], dtype=np.float64)
        constraints.append(LinearConstraint(code_bits[None, :], -np.inf, math.floor(budget.avg_bits * total + 1e-9)))
    if budget.bops is not None:
        bops = np.array([layers[i].bops(b) for i, b in columns], dtype=np.float64)
        constraints.append(LinearConstraint(bops[None, :], -np.inf, budget.bops))
    result = milp(
        cost, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints, options={"mip_rel_gap": 0}
    )
    if result.x is None:
        raise AllocationError(f"no allocation meets the budgets together ({result.message}); loosen one of them")
    chosen = np.round(result.x).astype(bool)
    bits = {layers[i].name: b for (i, b), take in zip(columns, chosen, strict=True) if take}
    allocation = evaluate(table, bits)
    assert len(bits) == len(layers)
    assert budget.size_bytes is None or allocation.weight_bytes <= budget.size_bytes
    return allocation


def pareto_front(table: SensitivityTable, points: int = 40) -> list[Allocation]:
    """Optimal allocations for `points` size budgets from the smallest to the largest reachable size."""
    layers = table.layers
    least = _reachable(layers, LayerSensitivity.weight_bytes)
    most = _reachable(layers, LayerSensitivity.weight_bytes, max)
    front: list[Allocation] = []
    for budget in np.linspace(least, most, points):
        allocation = allocate(table, Budget(size_bytes=int(budget)))
        if not front or allocation.weight_bytes != front[-1].weight_bytes:
            front.append(allocation)
    return front


def apply_bits(model: nn.Module, bits: dict[str, int]) -> None:
    """Set each quantized layer's weight width (before its range is calibrated)."""
    layers = quant_layers(model)
    missing = set(layers) ^ set(bits)
    if missing:
        raise AllocationError(f"the allocation does not match the model's quantized layers ({sorted(missing)[:3]})")
    for name, b in bits.items():
        layers[name].weight_quantizer.bits = b
