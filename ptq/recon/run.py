"""Reconstruct every unit of a calibrated model in network order, resumably, one unit's cache at a time.

Before any work, the cache each unit needs (its inputs and targets for the whole calibration set) is estimated from
a one-example probe and a placement is chosen: on the device when it fits comfortably, else in host memory, in the
configured dtype (half precision halves it). The naive alternative — every unit cached at once — is reported
alongside for comparison.

After each unit its learned state (hard-rounded weights, weight scales, activation steps) is checkpointed in a work
folder; rerunning the same job skips the finished units (loading their state) and continues, giving the same result
as an uninterrupted seeded run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ptq import distributed
from ptq._io import atomic_path
from ptq.config import (
    RECON_ACT_LR,
    RECON_PRESETS,
    RECON_REG_WEIGHT,
    CachePlacement,
    ConfigError,
    Method,
    ReconConfig,
    to_plain,
)
from ptq.errors import PtqError
from ptq.quant.modules import ActQuantizer
from ptq.recon.engine import Settings, collect, fp_reference, reconstruct_unit, total_iters, unit_error
from ptq.recon.units import Unit, find_units

log = logging.getLogger(__name__)
Progress = Callable[..., None]  # progress(label, done, total, note=None)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_SHARE = 0.5  # the cache may take this share of the device's free memory; the rest is for the unit's training


class ReconError(PtqError, RuntimeError):
    """Reconstruction cannot run as configured; the message says how to fix it."""


def units_for(model: nn.Module, method: Method, example: torch.Tensor) -> list[Unit]:
    """AdaRound works layer by layer; BRECQ and QDrop block by block."""
    return find_units(model, example, layerwise=method is Method.ADAROUND)


def has_depthwise(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())


def settings_for(method: Method, config: ReconConfig, depthwise: bool = False) -> Settings:
    """The per-unit settings of a method: its published defaults (λ 0.1 for a network with depthwise convolutions,
    as published for MobileNetV2), overridden by what `config` sets."""
    preset = RECON_PRESETS.get(method, RECON_PRESETS[Method.ADAROUND])
    act_steps = config.act_steps or preset["act_steps"]
    return Settings(
        iters=config.iters,
        batch_size=config.batch_size,
        lr=config.lr,
        reg_weight=config.reg_weight if config.reg_weight is not None else RECON_REG_WEIGHT[depthwise],
        keep_prob=config.keep_prob if config.keep_prob is not None else preset["keep_prob"],
        act_steps=act_steps,
        act_lr=config.act_lr or RECON_ACT_LR[act_steps],
        act_iters=config.act_iters or max(1, config.iters // 4),
        weight_scale_lr=config.weight_scale_lr if config.learn_weight_scale else None,
        act_search=config.act_search,
        seed=config.seed,
    )


@dataclass
class CachePlan:
    store: torch.device
    dtype: torch.dtype
    unit_bytes: list[int]  # per unit, for the whole calibration set

    @property
    def peak_bytes(self) -> int:
        return max(self.unit_bytes, default=0)

    @property
    def naive_bytes(self) -> int:
        """What caching every unit at once would take."""
        return sum(self.unit_bytes)

    def describe(self) -> dict[str, Any]:
        return {
            "placement": self.store.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "peak_unit_mb": round(self.peak_bytes / 2**20, 1),
            "all_units_mb": round(self.naive_bytes / 2**20, 1),
        }


def _host_available() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def plan_cache(
    units: list[Unit], images: int, config: ReconConfig, settings: Settings, device: torch.device
) -> CachePlan:
    """Size every unit's cache and choose where it lives (see the module docstring); fails early if it cannot fit."""
    dtype = DTYPES[config.cache_dtype.value]
    size = torch.tensor([], dtype=dtype).element_size()
    fp_in = settings.keep_prob < 1
    unit_bytes = [images * size * (u.in_numel * (1 + fp_in) + u.out_numel * (1 + config.fisher)) for u in units]
    peak = max(unit_bytes, default=0)
    store = torch.device("cpu")
    if device.type == "cuda" and config.cache is not CachePlacement.CPU:
        free, _ = torch.cuda.mem_get_info(device)
        if config.cache is CachePlacement.DEVICE or peak <= DEVICE_SHARE * free:
            store = device
    available = _host_available()
    if store.type == "cpu" and available is not None and peak > 0.8 * available:
        hint = "recon.cache_dtype=float16 or " if dtype == torch.float32 else ""
        raise ReconError(
            f"the largest unit's cache needs {peak / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB of memory "
            f"is free: use --set {hint}fewer calibration images (--set calib.num_images=N)"
        )
    return CachePlan(store, dtype, unit_bytes)


def _fingerprint(
    method: Method, config: ReconConfig, units: list[Unit], images: int, first: torch.Tensor, context: Any = None
) -> str:
    """What a unit's checkpoint depends on (with `context`: what came before, e.g. the quantization config); not the
    number of processes, so a rerun may use any."""
    key = {
        "context": context,
        "method": method.value,
        "config": to_plain({k: v for k, v in config.__dict__.items() if k not in ("cache", "cache_dtype")}),
        "units": [u.name for u in units],
        "images": images,
        "first": float(first.double().sum()),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _unit_tensors(model: nn.Module, unit: Unit) -> dict[str, torch.Tensor]:
    """What reconstruction changes in a unit, by checkpoint key: layer weights, weight scales, activation steps."""
    tensors = {}
    for name in unit.layers:
        layer = model.get_submodule(name)
        tensors[f"weight:{name}"] = layer.layer.weight
        tensors[f"weight_scale:{name}"] = layer.weight_quantizer.scale
    for name, m in unit.module(model).named_modules():
        if isinstance(m, ActQuantizer):
            tensors[f"act_scale:{unit.name}.{name}"] = m.scale
    return tensors


def _unit_state(model: nn.Module, unit: Unit) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in _unit_tensors(model, unit).items()}


def _resume_unit(path: Path | None, fp: str, model: nn.Module, unit: Unit) -> bool:
    """Whether the unit's checkpoint was loaded: rank 0 reads it and hands its tensors to every rank."""
    loaded = distributed.broadcast_object(
        path is not None and distributed.world().main and _load_unit(path, fp, model, unit)
    )
    if loaded:
        distributed.broadcast_(_unit_tensors(model, unit).values())
    return loaded


def _load_unit(path: Path, fp: str, model: nn.Module, unit: Unit) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fp:
                return False
            saved = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError):
        return False
    current = _unit_tensors(model, unit)
    if set(saved) != set(current) or any(saved[k].shape != current[k].shape for k in saved):
        return False
    with torch.no_grad():
        for key, tensor in current.items():
            tensor.copy_(saved[key])
    return True


def reconstruct(
    model: nn.Module,
    batches: list[torch.Tensor],
    method: Method,
    config: ReconConfig,
    work_dir: str | Path | None = None,
    progress: Progress | None = None,
    reference: nn.Module | None = None,
    starts: dict[str, torch.Tensor] | None = None,
    context: Any = None,
) -> dict[str, Any]:
    """Reconstruct all units of `model` in place; returns a per-unit summary.

    `reference`: the FP copy whose forwards give the targets (`fp_reference`, made here when not given; give it when
    the model's weights or biases were changed since calibration, e.g. by GPTQ or bias correction). `starts`: per
    layer, the weights its learned rounding starts from (GPTQ's error-compensated weights: a warm start) instead of
    its own. `context`: what the result also depends on, for the unit checkpoints' fingerprint.

    Under torchrun, `batches` are this rank's contiguous share of the calibration images (rank order = image
    order): each rank caches only its share of every unit, gradients are summed over ranks (see `_optimise`), every
    unit ends with rank 0's state on all ranks, and rank 0 writes the checkpoints in `work_dir`."""
    if config.fisher and getattr(model, "num_classes", 1) == 0:
        raise ConfigError("recon.fisher needs a classifier head (the task loss uses the model's own predictions)")
    units = units_for(model, method, batches[0][:1])
    settings = settings_for(method, config, has_depthwise(model))
    device = next(model.parameters()).device
    images = sum(b.shape[0] for b in batches)
    plan = plan_cache(units, images, config, settings, device)
    log.info(
        "reconstruction cache: %s, %s, %.1f MiB for the largest unit (all units at once: %.1f MiB)",
        plan.store.type, plan.describe()["dtype"], plan.peak_bytes / 2**20, plan.naive_bytes / 2**20,
    )  # fmt: skip
    if progress is not None:
        d = plan.describe()
        progress("reconstruct", 0, None, note=f"cache: {d['placement']} {d['dtype']}, {d['peak_unit_mb']} MiB per unit")
    w = distributed.world()
    fp = distributed.broadcast_object(  # rank 0's first image is the calibration set's first
        _fingerprint(method, config, units, sum(distributed.gather_objects(images)), batches[0][:1], context)
    )
    work = Path(work_dir) if work_dir is not None else None
    if work is not None and w.main:
        work.mkdir(parents=True, exist_ok=True)
    if reference is None:
        reference = fp_reference(model)  # the FP targets, kept apart from the weights reconstruction rounds
    summary: list[dict[str, Any]] = []
    counts = [total_iters(settings, u, model) for u in units]
    total = sum(counts)
    start = time.perf_counter()
    for i, unit in enumerate(units):
        done = sum(counts[:i])
        label = f"{unit.name} ({i + 1}/{len(units)})"
        path = work / f"unit_{i:04d}.safetensors" if work is not None else None
        if _resume_unit(path, fp, model, unit):
            summary.append({"unit": unit.name, "resumed": True})
            if progress is not None:
                progress("reconstruct", done + counts[i], total, note=f"{label} resumed")
            continue
        data = collect(model, unit, batches, plan.store, plan.dtype, settings.keep_prob < 1, config.fisher, reference)
        before = unit_error(model, unit, data)

        def step(it, rec, done=done, label=label):
            if progress is not None:
                progress("reconstruct", done + it, total, note=f"{label} loss {rec:.4g}")

        result = reconstruct_unit(model, unit, data, settings, step, start=starts, seed=config.seed + i)
        del data
        distributed.broadcast_(_unit_tensors(model, unit).values())  # ranks stay bit-identical
        summary.append(
            {
                "unit": unit.name,
                "rtn_error": before,
                "error": result["reconstruction_error"],
                "diverged": result["diverged"],
            }
        )
        log.info("unit %s: error %.4g → %.4g", unit.name, before, result["reconstruction_error"])
        if path is not None and w.main:
            with atomic_path(path) as tmp:
                save_file(_unit_state(model, unit), str(tmp), metadata={"fingerprint": fp, "unit": unit.name})
    return {
        "method": method.value,
        "units": len(units),
        "keep_prob": settings.keep_prob,
        "reg_weight": settings.reg_weight,
        "act_steps": settings.act_steps.value,
        "learn_weight_scale": settings.weight_scale_lr is not None,
        "fisher": config.fisher,
        "init": config.init.value,
        "cache": plan.describe(),
        "processes": w.size,
        "seconds": round(time.perf_counter() - start, 2),
        "per_unit": summary,
    }
