"""Batch evaluation of FP timm models and quantized outputs on an image folder.

Each model is evaluated with its own timm data config. A quantized output folder is compared with its FP parent
(agreement, KL, logit SQNR — no labels needed); with labels, top-1/top-5 are reported too. Wildcards expand over
timm's model names. A model that fails is recorded with its error and the run goes on (as timm's validate.py
does); on out-of-memory the batch size is halved and the model retried.

Metrics are kept per batch and summed in batch order, so a run under torchrun — whole models shared out across
ranks, or one model's batches — gives exactly the numbers of one process.
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
from torch.utils.data import Dataset, Subset

from ptq import distributed
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
def batch_metrics(
    model: nn.Module,
    loader,
    device: torch.device | str,
    fp_model: nn.Module | None = None,
    progress: Progress | None = None,
    label: str = "",
) -> list[tuple[MetricSums, MetricSums | None]]:
    """Per batch: the metrics of `model` (against labels and, if given, `fp_model`) and of `fp_model` against labels."""
    parts = []
    total = len(loader) if hasattr(loader, "__len__") else None
    for i, (images, labels) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        logits = model(images)
        fp_logits = fp_model(images) if fp_model is not None else None
        labels = labels.to(logits.device)
        sums, fp_sums = MetricSums(), (MetricSums() if fp_model is not None else None)
        sums.update(logits, labels, fp_logits)
        if fp_sums is not None:
            fp_sums.update(fp_logits, labels)
        parts.append((sums, fp_sums))
        if progress is not None:
            progress(label, i + 1, total)
    return parts


def fold(parts: list[tuple[MetricSums, MetricSums | None]]) -> tuple[MetricSums, MetricSums | None]:
    """Per-batch metrics summed in batch order: the same numbers, bit for bit, however the batches were shared out."""
    sums, fp_sums = MetricSums(), None
    for batch, fp_batch in parts:
        sums = sums.merge(batch)
        if fp_batch is not None:
            fp_sums = fp_batch if fp_sums is None else fp_sums.merge(fp_batch)
    return sums, fp_sums


def batch_shard(dataset: Dataset, batch_size: int) -> Dataset:
    """This rank's contiguous run of whole batches of `dataset` (all of it for one process), so that every batch
    holds the same images as in a one-process run."""
    n = len(dataset)
    mine = distributed.world().shard(-(-n // batch_size))
    if len(mine) * batch_size >= n:
        return dataset
    return Subset(dataset, range(mine.start * batch_size, min(mine.stop * batch_size, n)))


def run_metrics(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str,
    fp_model: nn.Module | None = None,
    workers: int = 0,
    progress: Progress | None = None,
    label: str = "",
) -> tuple[MetricSums, MetricSums | None]:
    """Metrics of `model` (and of `fp_model` against labels) over `dataset`; under torchrun every rank evaluates
    its share of the batches and all ranks return the exact one-process sums."""
    loader = make_loader(batch_shard(dataset, batch_size), batch_size, workers, device)
    parts = distributed.gather_objects(batch_metrics(model, loader, device, fp_model, progress, label))
    return fold([p for part in parts for p in part])


def row_for(spec: str, kind: str) -> dict[str, Any]:
    return {f: None for f in FIELDS} | {"model": spec, "kind": kind}


def _onnx_model(spec: str, device) -> tuple[Any, dict[str, Any], nn.Module | None, str | None]:
    """An exported `.onnx` file run by onnxruntime, its data config and FP parent (from the file's metadata)."""
    from ptq.export.onnx import ExportError, OnnxModel

    if not Path(spec).is_file():
        raise FileNotFoundError(f"{spec} does not exist; pass a file written by `ptq export`")
    model = OnnxModel(spec)
    if not model.meta:
        raise ExportError(f"{spec} carries no ptq metadata (data config, FP model); export it with `ptq export`")
    data_config = data_config_from(model.meta)
    try:
        fp_model, _ = load_model(model.meta["model"], checkpoint=model.meta.get("checkpoint"), device=device)
        return model, data_config, fp_model, None
    except ModelLoadError as e:
        return model, data_config, None, f"FP parent unavailable, no agreement/KL/SQNR: {e}"


def evaluate_one(
    spec: str,
    data: str | Path,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    workers: int = 0,
    progress: Progress | None = None,
    shard_data: bool = False,
) -> dict[str, Any]:
    """One result row. With `shard_data` (under torchrun) every rank evaluates its share of the batches and every
    rank must call this for the same `spec`: the ranks' results meet once, whether or not they failed."""
    quantized = (Path(spec) / CONFIG_FILE).is_file()
    onnx_file = Path(spec).suffix == ".onnx"
    row = row_for(spec, "onnx" if onnx_file else "quantized" if quantized else "fp")

    def load() -> tuple[Any, dict, nn.Module | None]:
        if onnx_file:
            model, data_config, fp_model, row["error"] = _onnx_model(spec, device)
            return model, data_config, fp_model
        if quantized:
            meta = read_quant_config(spec)
            model, data_config = load_quantized(spec, device), data_config_from(meta)
            try:
                fp_model, _ = load_model(meta["model"], checkpoint=meta.get("checkpoint"), device=device)
            except ModelLoadError as e:  # still report accuracy; fidelity needs the parent
                fp_model, row["error"] = None, f"FP parent unavailable, no agreement/KL/SQNR: {e}"
            return model, data_config, fp_model
        if Path(spec).is_dir():
            raise FileNotFoundError(
                f"{spec} is a folder without {CONFIG_FILE}; pass a `ptq quantize` output or a timm name"
            )
        model, data_config = load_model(spec, device=device)
        return model, data_config, None

    return measure(row, load, data, batch_size, device, workers, progress, shard_data)


def measure(
    row: dict[str, Any],
    load: Callable[[], tuple[Any, dict, nn.Module | None]],
    data: str | Path,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    workers: int = 0,
    progress: Progress | None = None,
    shard_data: bool = False,
) -> dict[str, Any]:
    """Fill `row` with the metrics of the model `load()` returns (model, data config, FP parent or None) on the
    images in `data`; any failure is recorded in the row, not raised."""
    start = time.perf_counter()
    parts, error = [], None
    try:
        model, data_config, fp_model = load()
        dataset = ImageFolder(data, data_config)
        if shard_data:
            dataset = batch_shard(dataset, batch_size)
        while True:
            try:
                loader = make_loader(dataset, batch_size, workers, device)
                parts = batch_metrics(model, loader, device, fp_model, progress, row["model"])
                break
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                log.warning("out of memory on %s; retrying with batch size %d", row["model"], batch_size)
    except Exception as e:  # noqa: BLE001 - one failing model must not stop a batch evaluation
        error = f"{type(e).__name__}: {e}"
    if shard_data:
        results = distributed.gather_objects((parts, error))
        parts = [p for part, _ in results for p in part]
        error = next((f"rank {r}: {e}" for r, (_, e) in enumerate(results) if e is not None), None)
    if error is not None:
        row["error"] = error
        log.warning("%s failed: %s", row["model"], error)
    else:
        sums, _ = fold(parts)
        row.update(sums.summary(), images=sums.images)
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
    """One result row per model (see FIELDS), in the order given; the data folder is checked once before any
    model is loaded. Under torchrun, with at least as many models as ranks, whole models are shared out across
    ranks; with fewer, every model's images are. Every rank returns all rows."""
    find_images(data)
    specs = expand_specs(specs)
    w = distributed.world()
    if len(specs) < w.size or not w.distributed:
        return [evaluate_one(spec, data, batch_size, device, workers, progress, w.distributed) for spec in specs]
    rows: list[dict[str, Any]] = []
    for start in range(0, len(specs), w.size):  # rounds of one model per rank: no rank waits longer than one model
        i = start + w.rank
        row = evaluate_one(specs[i], data, batch_size, device, workers, progress) if i < len(specs) else None
        rows += [r for r in distributed.gather_objects(row) if r is not None]
    return rows
