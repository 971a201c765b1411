"""The main job: load → (synthesize) → prepare → calibrate → compare with FP → write a packed checkpoint, atomically.

`OUT/` receives `model.safetensors` (packed integer weights), `quant_config.json`, `recipe.yaml` (resolved) and
`report.json` (timings, sizes, fidelity). Everything is written into a staging folder first and moved into place only
when complete, so an interrupted run leaves no half-written `OUT`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from ptq._io import check_output_dir, staged_dir, write_json, write_text
from ptq.config import Method, Recipe, SynthMethod, dump_recipe
from ptq.data import DataError, ImageFolder, calibration_set, image_batches, make_loader
from ptq.eval.harness import run_metrics
from ptq.export.checkpoint import WEIGHTS_FILE, fp32_weight_bytes, save_quantized
from ptq.models import cache_dir, load_model
from ptq.quant import calibrate, prepare
from ptq.quant.prepare import layer_bits
from ptq.recon.run import reconstruct
from ptq.synth import SynthError, SyntheticSet, class_statistics, synthesize
from ptq.synth.run import fingerprint as synth_fingerprint
from ptq.synth.shards import META_FILE

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int | None], None]


@contextmanager
def _timed(timings: dict[str, float], key: str):
    start = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - start, 3)


def real_images(
    folder: str | Path, data_config: dict, num_images: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Up to `num_images` real images as one tensor, with their class-folder labels when the folder has them."""
    subset = calibration_set(folder, data_config, num_images, seed)
    images, labels = zip(*(subset[i] for i in range(len(subset))), strict=True)
    labels = torch.tensor(labels)
    return torch.stack(images), (labels if bool((labels >= 0).all()) else None)


def default_synth_dir(model_name: str, data_config: dict, recipe: Recipe) -> Path:
    return cache_dir() / "synth" / f"{model_name}-{synth_fingerprint(model_name, data_config, recipe.synth)}"


def synthesize_set(
    fp_model: nn.Module,
    model_name: str,
    data_config: dict,
    recipe: Recipe,
    out: str | Path,
    calib_data: str | Path | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Synthesize (or resume, or reuse) a set in `out`; returns its metadata and the real images FDDA used."""
    real = None
    class_stats = None
    if recipe.synth.method is SynthMethod.FDDA:
        if calib_data is None:
            raise SynthError("fdda needs a few real images (one per class is enough): pass --calib-data DIR")
        real, labels = real_images(calib_data, data_config, recipe.calib.num_images, recipe.calib.seed)
        class_stats = class_statistics(fp_model, real.to(device), labels.to(device) if labels is not None else None)
    meta = synthesize(fp_model, model_name, data_config, recipe.synth, out, device, class_stats, overwrite, progress)
    return meta, real


def quantize(
    model_name: str,
    recipe: Recipe,
    calib_data: str | Path | None,
    out: str | Path,
    eval_data: str | Path | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    zero_shot: bool = False,
    synth_data: str | Path | None = None,
) -> dict[str, Any]:
    """PTQ of a timm model calibrated on real images or (zero-shot) on synthesized ones: round-to-nearest, then, for
    adaround/brecq/qdrop, reconstruction of every unit (resumable from `.OUT.recon/`)."""
    check_output_dir(out, overwrite)  # fail before any work
    if not zero_shot and calib_data is None:
        raise DataError("no calibration data: pass --calib-data DIR, or --zero-shot to synthesize it")
    timings: dict[str, float] = {}
    q = recipe.quant
    with _timed(timings, "load"):
        fp_model, data_config = load_model(model_name, checkpoint=checkpoint, device=device)
        eval_folder = eval_data or calib_data
        evalset = ImageFolder(eval_folder, data_config) if eval_folder is not None else None
        if not zero_shot:
            calib = calibration_set(calib_data, data_config, recipe.calib.num_images, recipe.calib.seed)
    synth_meta = None
    if zero_shot:
        with _timed(timings, "synthesize"):
            folder = Path(synth_data) if synth_data else default_synth_dir(model_name, data_config, recipe)
            calib, synth_meta = _synthetic_calibration(
                fp_model, model_name, data_config, recipe, folder, calib_data, device, progress
            )
    with _timed(timings, "prepare"):
        example = torch.zeros((1, *data_config["input_size"]), device=device)
        qmodel = prepare(fp_model, q, example)
    with _timed(timings, "calibrate"):
        loader = make_loader(calib, recipe.calib.batch_size, recipe.calib.workers, device)
        batches = _counted(image_batches(loader, device), len(loader))
        if recipe.method is not Method.RTN:
            batches = list(batches)  # reconstruction reuses them: load and preprocess the images once
        calibrate(qmodel, batches, q, progress)
    recon_summary = None
    work_dir = Path(out).parent / f".{Path(out).name}.recon"  # per-unit checkpoints: a rerun resumes
    if recipe.method is not Method.RTN:
        with _timed(timings, "reconstruct"):
            recon_summary = reconstruct(qmodel, batches, recipe.method, recipe.recon, work_dir, progress)
    report: dict[str, Any] = {
        "model": model_name,
        "weights": getattr(fp_model, "ptq_weights_source", None),
        "method": recipe.method.value,
        "w_bits": q.w_bits,
        "a_bits": q.a_bits,
        "bit_convention": q.first_last_bits.value,
        "calibration": {
            "data": "synthetic" if zero_shot else str(calib_data),
            "images": len(calib),
            "synthetic": synth_meta,
        },
        "reconstruction": recon_summary,
        "evaluation": None,
        "fp_evaluation": None,
        "device": str(device),
    }
    if evalset is not None:
        with _timed(timings, "evaluate"):
            eval_loader = make_loader(evalset, recipe.calib.batch_size, recipe.calib.workers, device)
            sums, fp_sums = run_metrics(qmodel, eval_loader, device, fp_model, progress, "compare with FP")
        report["evaluation"] = {"data": str(eval_folder), "images": sums.images, **sums.summary()}
        report["fp_evaluation"] = {"top1": fp_sums.summary()["top1"], "top5": fp_sums.summary()["top5"]}
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
    shutil.rmtree(work_dir, ignore_errors=True)  # the output is complete: checkpoints of units are no longer needed
    return report


def _synthetic_calibration(fp_model, model_name, data_config, recipe, folder, calib_data, device, progress):
    """The calibration set of a zero-shot run: a finished set in `folder` reused as is, else synthesized (resumed)."""
    if (folder / META_FILE).is_file():
        try:
            synthetic = SyntheticSet(folder)
        except FileNotFoundError:
            synthetic = None  # unfinished or damaged: synthesize resumes it below
        if synthetic is not None:
            made_for = (synthetic.meta.get("model"), list(synthetic.meta["data_config"]["input_size"]))
            if made_for != (model_name, list(data_config["input_size"])):
                raise SynthError(f"--synth-data {folder} was made for {made_for[0]} at {made_for[1]}; synthesize anew")
            log.info("reusing the synthetic set in %s", folder)
            real = None
            if recipe.synth.method is SynthMethod.FDDA and calib_data is not None:
                real, _ = real_images(calib_data, data_config, recipe.calib.num_images, recipe.calib.seed)
            return _with_real(synthetic, real), {"folder": str(folder), **_brief(synthetic.meta)}
    meta, real = synthesize_set(fp_model, model_name, data_config, recipe, folder, calib_data, device, False, progress)
    return _with_real(SyntheticSet(folder), real), {"folder": str(folder), **_brief(meta)}


def _with_real(synthetic: Dataset, real: torch.Tensor | None) -> Dataset:
    """FDDA: the real images join the synthetic ones in the calibration set."""
    if real is None:
        return synthetic
    return ConcatDataset([synthetic, TensorDataset(real, torch.full((real.shape[0],), -1))])


def _brief(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in ("method", "num_images", "fingerprint", "seconds", "resumed_batches")}


def _counted(iterable, n: int):
    """Give a generator a length so that progress can show a total."""

    class _Sized:
        def __iter__(self):
            return iter(iterable)

        def __len__(self):
            return n

    return _Sized()
