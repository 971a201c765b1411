"""Reconstruct every unit of a calibrated model in network order, resumably.

After each unit its hard-rounded weights are checkpointed in a work folder; rerunning the same job skips the finished
units (loading their weights) and continues, giving the same result as an uninterrupted seeded run. Each unit's
inputs and targets are collected for the calibration set when its turn comes — never all units at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ptq._io import atomic_path
from ptq.config import Method, ReconConfig, to_plain
from ptq.recon.engine import collect, reconstruct_unit, unit_error
from ptq.recon.units import Unit, find_units

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int | None], None]


def units_for(model: nn.Module, method: Method, example: torch.Tensor) -> list[Unit]:
    """AdaRound works layer by layer; BRECQ and QDrop block by block."""
    return find_units(model, example, layerwise=method is Method.ADAROUND)


def _fingerprint(method: Method, config: ReconConfig, units: list[Unit], batches: list[torch.Tensor]) -> str:
    key = {
        "method": method.value,
        "config": to_plain(config.__dict__),
        "units": [u.name for u in units],
        "images": sum(b.shape[0] for b in batches),
        "first": float(batches[0].double().sum()),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _load_unit(path: Path, fp: str, model: nn.Module, unit: Unit) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fp:
                return False
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError):
        return False
    if set(weights) != set(unit.layers):
        return False
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).layer.weight.copy_(w)
    return True


def reconstruct(
    model: nn.Module,
    batches: list[torch.Tensor],
    method: Method,
    config: ReconConfig,
    work_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Reconstruct all units of `model` in place; returns a per-unit summary."""
    units = units_for(model, method, batches[0][:1])
    keep = config.keep_prob if config.keep_prob is not None else (0.5 if method is Method.QDROP else 1.0)
    device = next(model.parameters()).device
    store = device if config.cache == "device" else torch.device("cpu")
    fp = _fingerprint(method, config, units, batches)
    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    summary: list[dict[str, Any]] = []
    total = len(units) * config.iters
    start = time.perf_counter()
    for i, unit in enumerate(units):
        path = work / f"unit_{i:04d}.safetensors" if work is not None else None
        if path is not None and path.is_file() and _load_unit(path, fp, model, unit):
            summary.append({"unit": unit.name, "resumed": True})
            if progress is not None:
                progress("reconstruct", (i + 1) * config.iters, total)
            continue
        data = collect(model, unit, batches, store)
        before = unit_error(model, unit, data)

        def step(it, rec, done=i * config.iters):
            if progress is not None:
                progress("reconstruct", done + it, total)

        result = reconstruct_unit(
            model, unit, data, config.iters, config.batch_size, config.lr, config.reg_weight, keep,
            config.seed + i, step,
        )  # fmt: skip
        del data
        summary.append(
            {
                "unit": unit.name,
                "rtn_error": before,
                "error": result["reconstruction_error"],
                "diverged": result["diverged"],
            }
        )
        log.info("unit %s: error %.4g → %.4g", unit.name, before, result["reconstruction_error"])
        if path is not None:
            weights = {name: model.get_submodule(name).layer.weight.detach().cpu().contiguous() for name in unit.layers}
            with atomic_path(path) as tmp:
                save_file(weights, str(tmp), metadata={"fingerprint": fp, "unit": unit.name})
    return {
        "method": method.value,
        "units": len(units),
        "keep_prob": keep,
        "seconds": round(time.perf_counter() - start, 2),
        "per_unit": summary,
    }
