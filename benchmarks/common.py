"""What the benchmark scripts share: naming the device and writing a result JSON."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from ptq._malloc import keep_freed_memory

keep_freed_memory()  # as the command line does: measure what users run
RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_result(result: dict, name: str, out: str | None = None) -> Path:
    """Write `result` to `out`, or to benchmarks/results/`name`; print and return the path."""
    path = Path(out) if out else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def update_readme(text: str, marker: str) -> None:
    """Replace what README.md holds between `<!-- MARKER:begin -->` and `<!-- MARKER:end -->` with `text`."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    readme = Path(__file__).resolve().parents[1] / "README.md"
    content = readme.read_text()
    if begin not in content or end not in content:
        print(f"README.md has no {begin} … {end} markers; table not written there")
        return
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
    print("updated the table in README.md")
