"""Batch evaluation of FP timm models and quantized outputs on an image folder.

Each model is evaluated with its own timm data config. A quantized output folder is compared with its FP parent
(agreement, KL, logit SQNR — no labels needed); with labels, top-1/top-5 are reported too. Wildcards expand over
timm's model names. A model that fails is recorded with its error and the run goes on (as timm's validate.py
does); on out-of-memory the batch size is halved and the model retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ptq.data import ImageFolder, find_images, make_loader
from ptq.eval.metrics import MetricSums
from ptq.export.checkpoint import CONFIG_FILE, data_config_from, load_quantized, read_quant_config
from ptq.models import ModelLoadError, load_model

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int | None], None]
FIELDS = ("model", "kind", "top1", "top5", "agreement", "kl", "sqnr_db", "images", "seconds", "error")


def expand_specs(specs: list[str]) -> list[str]:
    """Quantized output folders stay as given; timm wildcards expand to the matching model names."""
    out: list[str] = []
    for spec in specs:
        if Path(spec).is_dir() or not any(c in spec for c in "*?["):
            out.append(spec)
            continue
        matches = timm.list_models(spec)
        out.extend(matches if matches else [spec])
    return out


@torch.no_grad()
def run_metrics(
    model: nn.Module,
    loader,
    device: torch.device | str,
    fp_model: nn.Module | None = None,
    progress: Progress | None = None,
    label: str = "",
) -> tuple[MetricSums, MetricSums | None]:
    """Metrics of `model` (against labels and, if given, `fp_model`) and of `fp_model` against labels."""
    sums, fp_sums = MetricSums(), (MetricSums() if fp_model is not None else None)
    total = len(loader) if hasattr(loader, "__len__") else None
    for i, (images, labels) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        logits = model(images)
        fp_logits = fp_model(images) if fp_model is not None else None
        labels = labels.to(logits.device)
        sums.update(logits, labels, fp_logits)
        if fp_sums is not None:
            fp_sums.update(fp_logits, labels)
        if progress is not None:
            progress(label, i + 1, total)
    return sums, fp_sums


def _row(spec: str, kind: str) -> dict[str, Any]:
    return {f: None for f in FIELDS} | {"model": spec, "kind": kind}


def evaluate_one(
    spec: str,
    data: str | Path,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    workers: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    quantized = (Path(spec) / CONFIG_FILE).is_file()
    row = _row(spec, "quantized" if quantized else "fp")
    start = time.perf_counter()
    try:
        if quantized:
            meta = read_quant_config(spec)
            model, data_config = load_quantized(spec, device), data_config_from(meta)
            try:
                fp_model, _ = load_model(meta["model"], checkpoint=meta.get("checkpoint"), device=device)
            except ModelLoadError as e:  # still report accuracy; fidelity needs the parent
                fp_model, row["error"] = None, f"FP parent unavailable, no agreement/KL/SQNR: {e}"
        elif Path(spec).is_dir():
            raise FileNotFoundError(
                f"{spec} is a folder without {CONFIG_FILE}; pass a `ptq quantize` output or a timm name"
            )
        else:
            model, data_config = load_model(spec, device=device)
            fp_model = None
        dataset = ImageFolder(data, data_config)
        while True:
            try:
                sums, _ = run_metrics(
                    model, make_loader(dataset, batch_size, workers, device), device, fp_model, progress, spec
                )
                break
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                log.warning("out of memory on %s; retrying with batch size %d", spec, batch_size)
        row.update(sums.summary(), images=sums.images)
    except Exception as e:  # noqa: BLE001 - one failing model must not stop a batch evaluation
        row["error"] = f"{type(e).__name__}: {e}"
        log.warning("%s failed: %s", spec, row["error"])
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def evaluate(
    specs: list[str],
    data: str | Path,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    workers: int = 0,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """One result row per model (see FIELDS); the data folder is checked once before any model is loaded."""
    find_images(data)
    return [evaluate_one(spec, data, batch_size, device, workers, progress) for spec in expand_specs(specs)]
