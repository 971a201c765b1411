"""What a `quantize` run reports, as one typed record; `report.json` in an output folder is its `to_dict()`."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Report:
    """A quantize run: what was made (model, weights' source, method, bits, bit convention, mixed-precision choice),
    from what (calibration data), how (rounding and reconstruction summaries, device, processes, seconds per stage),
    and how close it is (evaluation against FP on the evaluation images, when there are some) and how small (size;
    for an in-memory model the bytes of the tensors a checkpoint would hold). `export`: added by `ptq export`."""

    model: str
    weights: str | None
    method: str
    w_bits: int | str  # "auto": mixed precision, see `mixed`
    a_bits: int
    bit_convention: str
    calibration: dict[str, Any]
    device: str
    processes: int = 1
    mixed: dict[str, Any] | None = None
    rounding: dict[str, Any] | None = None
    reconstruction: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    fp_evaluation: dict[str, Any] | None = None
    layers: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
    size: dict[str, Any] | None = None
    export: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["export"] is None:
            del data["export"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """A report read back from `report.json` (keys this version does not know are left out)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
