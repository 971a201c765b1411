"""The main job: load → prepare → calibrate → compare with FP → write a packed checkpoint folder, atomically.

`OUT/` receives `model.safetensors` (packed integer weights), `quant_config.json`, `recipe.yaml` (resolved) and
`report.json` (timings, sizes, fidelity). Everything is written into a staging folder first and moved into place only
when complete, so an interrupted run leaves no half-written `OUT`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ptq._io import check_output_dir, staged_dir, write_json, write_text
from ptq.config import Recipe, dump_recipe
from ptq.data import ImageFolder, calibration_set, image_batches, make_loader
from ptq.eval.harness import run_metrics
from ptq.export.checkpoint import WEIGHTS_FILE, fp32_weight_bytes, save_quantized
from ptq.models import load_model
from ptq.quant import calibrate, prepare
from ptq.quant.prepare import layer_bits

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int | None], None]


@contextmanager
def _timed(timings: dict[str, float], key: str):
    start = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - start, 3)


def quantize(
    model_name: str,
    recipe: Recipe,
    calib_data: str | Path,
    out: str | Path,
    eval_data: str | Path | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Round-to-nearest PTQ of a timm model calibrated on a folder of real images; returns the report."""
    check_output_dir(out, overwrite)  # fail before any work
    timings: dict[str, float] = {}
    q = recipe.quant
    with _timed(timings, "load"):
        fp_model, data_config = load_model(model_name, checkpoint=checkpoint, device=device)
        calib = calibration_set(calib_data, data_config, recipe.calib.num_images, recipe.calib.seed)
        evalset = ImageFolder(eval_data or calib_data, data_config)
    with _timed(timings, "prepare"):
        example = torch.zeros((1, *data_config["input_size"]), device=device)
        qmodel = prepare(fp_model, q, example)
    with _timed(timings, "calibrate"):
        loader = make_loader(calib, recipe.calib.batch_size, recipe.calib.workers, device)
        calibrate(qmodel, _counted(image_batches(loader, device), len(loader)), q, progress)
    with _timed(timings, "evaluate"):
        eval_loader = make_loader(evalset, recipe.calib.batch_size, recipe.calib.workers, device)
        sums, fp_sums = run_metrics(qmodel, eval_loader, device, fp_model, progress, "compare with FP")
    report: dict[str, Any] = {
        "model": model_name,
        "weights": getattr(fp_model, "ptq_weights_source", None),
        "method": recipe.method.value,
        "w_bits": q.w_bits,
        "a_bits": q.a_bits,
        "bit_convention": q.first_last_bits.value,
        "calibration": {"data": str(calib_data), "images": len(calib)},
        "evaluation": {"data": str(eval_data or calib_data), "images": sums.images, **sums.summary()},
        "fp_evaluation": {"top1": fp_sums.summary()["top1"], "top5": fp_sums.summary()["top5"]},
        "device": str(device),
    }
    with _timed(timings, "save"), staged_dir(out, overwrite) as stage:
        meta = save_quantized(
            qmodel, stage, model_name, q, data_config, checkpoint=str(checkpoint) if checkpoint else None
        )
        fp_bytes, q_bytes = fp32_weight_bytes(fp_model), (stage / WEIGHTS_FILE).stat().st_size
        report["size"] = {"fp32_bytes": fp_bytes, "checkpoint_bytes": q_bytes, "ratio": round(q_bytes / fp_bytes, 4)}
        report["layers"] = {"quantized": len(meta["layers"]), "bits": layer_bits(qmodel)}
        report["timings_s"] = timings
        write_text(stage / "recipe.yaml", dump_recipe(recipe))
        write_json(stage / "report.json", report)
    report["timings_s"] = timings
    return report


def _counted(iterable, n: int):
    """Give a generator a length so that progress can show a total."""

    class _Sized:
        def __iter__(self):
            return iter(iterable)

        def __len__(self):
            return n

    return _Sized()
