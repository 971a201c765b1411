"""Mixed precision: per-layer Hessian sensitivity and bits by integer linear programming under a budget."""

from ptq.mixed.allocate import Allocation, AllocationError, Budget, allocate, apply_bits, pareto_front
from ptq.mixed.sensitivity import SensitivityTable, measure_sensitivity

__all__ = [
    "Allocation",
    "AllocationError",
    "Budget",
    "SensitivityTable",
    "allocate",
    "apply_bits",
    "measure_sensitivity",
    "pareto_front",
]
