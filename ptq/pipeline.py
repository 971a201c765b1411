"""The jobs behind the commands. `quantize`: load → prepare → (synthesize) → (sensitivity and bit allocation, for
`--bits auto`) → calibrate → (reconstruct) → compare with FP → write a packed checkpoint, atomically. `sensitivity`:
the per-layer table, Pareto front and plot only. `synthesize_set`: a synthetic calibration set in a folder.

`OUT/` receives `model.safetensors` (packed integer weights), `quant_config.json`, `recipe.yaml` (resolved) and
`report.json` (timings, sizes, fidelity). Everything is written into a staging folder first and moved into place only
when complete, so an interrupted run leaves no half-written `OUT`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ptq import distributed
from ptq._io import check_output_dir, staged_dir, write_json, write_text
from ptq.calibration import batches_of, calibration_images, share
from ptq.config import (
    BiasCorrection,
    Method,
    Recipe,
    ReconConfig,
    RoundingInit,
    check_job_recipe,
    dump_recipe,
    resolve_bias_correction,
    to_plain,
)
from ptq.data import DataError, ImageFolder
from ptq.eval.harness import run_metrics
from ptq.export.checkpoint import WEIGHTS_FILE, fp32_weight_bytes, packed_bytes, save_quantized
from ptq.mixed import Allocation, Budget, SensitivityTable, allocate, apply_bits, measure_sensitivity, pareto_front
from ptq.mixed.allocate import check_feasible, evaluate
from ptq.mixed.files import SENSITIVITY_FILE, read_sensitivity, sensitivity_csv
from ptq.mixed.plot import plot_sensitivity
from ptq.mixed.sensitivity import describe_layers
from ptq.models import load_model
from ptq.quant import calibrate, prepare
from ptq.quant.modules import quant_layers
from ptq.quant.prepare import layer_bits, layer_macs
from ptq.recon.analytic import analytic_input_means
from ptq.recon.engine import fp_reference
from ptq.recon.layerwise import Rounding, round_layers
from ptq.recon.run import reconstruct
from ptq.report import Report

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int | None], None]


@dataclasses.dataclass
class Job:
    """One `quantize` or `sensitivity` run: the model, the recipe, where calibration data comes from and where the
    result goes. Calibration data is a folder (`calib_data`), preprocessed images in memory (`images`: the Python
    API's tensor or DataLoader) or, with `zero_shot`, a synthetic set (`synth_data`, or the cache). Without `out`
    nothing is written (the Python API keeps the model in memory) and an interrupted run does not resume."""

    model: str  # timm name: loads the model, names caches and reports
    recipe: Recipe
    calib_data: Path | None = None
    images: Dataset | None = None
    zero_shot: bool = False
    synth_data: Path | None = None
    eval_data: Path | None = None
    out: Path | None = None
    checkpoint: Path | None = None
    sensitivity_file: Path | None = None
    device: str = "cpu"
    overwrite: bool = False

    def __post_init__(self):
        for name in ("calib_data", "synth_data", "eval_data", "out", "checkpoint", "sensitivity_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value))
        if not self.zero_shot and self.calib_data is None and self.images is None:
            raise DataError("no calibration data: pass --calib-data DIR, or --zero-shot to synthesize it")
        if self.zero_shot and self.images is not None:
            raise DataError("calibration images were given and zero-shot asked for; pass one of them")
        check_job_recipe(self.recipe)
        self.recipe = resolve_bias_correction(self.recipe, self.zero_shot)  # reports and checkpoints name the choice

    @property
    def calib_source(self) -> str:
        if self.zero_shot:
            return "synthetic"
        return str(self.calib_data) if self.calib_data is not None else "in-memory images"

    @property
    def work_dir(self) -> Path | None:
        """Per-layer/unit checkpoints of the rounding and reconstruction passes: a rerun resumes from them."""
        return None if self.out is None else self.out.parent / f".{self.out.name}.recon"


@contextmanager
def _timed(timings: dict[str, float], key: str):
    start = time.perf_counter()
    yield
    timings[key] = round(timings.get(key, 0.0) + time.perf_counter() - start, 3)  # a stage may run in parts


def calibration_data(
    fp_model: nn.Module, data_config: dict, job: Job, progress: Progress | None, timings: dict[str, float]
) -> tuple[Dataset, dict[str, Any] | None, Iterable[torch.Tensor]]:
    """The job's calibration set (`ptq.calibration.calibration_images`), timed, with its batches on the device."""
    with _timed(timings, "synthesize" if job.zero_shot else "load"):
        calib, meta = calibration_images(fp_model, data_config, job, progress)
    return calib, meta, batches_of(calib, job.recipe, job.device)


def mixed_bits(
    qmodel: nn.Module,
    batches: Iterable[torch.Tensor],
    model_name: str,
    recipe: Recipe,
    budget: Budget,
    sensitivity_file: str | Path | None = None,
    progress: Progress | None = None,
) -> tuple[SensitivityTable, Allocation]:
    """`--bits auto`: measure (or read) per-layer sensitivity, allocate under the budget, set the widths on `qmodel`."""
    if sensitivity_file is not None:
        table = read_sensitivity(sensitivity_file, model_name, qmodel, recipe)
    else:
        table = measure_sensitivity(qmodel, batches, model_name, recipe.quant, recipe.mixed, progress)
    allocation = distributed.broadcast_object(allocate(table, budget))  # one allocation, whatever the ranks measured
    apply_bits(qmodel, allocation.bits)
    return table, allocation


def _load_prepared(
    job: Job, timings: dict[str, float], loaded: tuple[nn.Module, dict] | None
) -> tuple[nn.Module, dict, nn.Module]:
    """The start of `quantize` and `sensitivity`: the output folder checked before any work, then (FP model, data
    config, prepared copy with quantizers placed). `loaded`: a model (and its data config) already in memory."""
    if job.out is not None:
        distributed.on_main(check_output_dir, job.out, job.overwrite)
    with _timed(timings, "load"):  # every rank loads; a bad name or checkpoint is reported once
        if loaded is None:
            loaded = distributed.together(load_model, job.model, checkpoint=job.checkpoint, device=job.device)
        fp_model, data_config = loaded
    with _timed(timings, "prepare"):
        example = torch.zeros((1, *data_config["input_size"]), device=job.device)
        qmodel = prepare(fp_model, job.recipe.quant, example)
    qmodel.ptq_state.data_config = data_config
    return fp_model, data_config, qmodel


def quantize(
    job: Job, progress: Progress | None = None, loaded: tuple[nn.Module, dict] | None = None
) -> tuple[nn.Module, Report]:
    """PTQ of a timm model (or `loaded`, a model already in memory with its data config) calibrated on real images
    or (zero-shot) on synthesized ones: round-to-nearest, GPTQ and/or bias correction, then, for
    adaround/brecq/qdrop, reconstruction of every unit (resumable when the job has an output folder). With
    `recipe.mixed.enabled` (`--bits auto`) the weight width of every layer is chosen under the budget before
    calibration. Returns the quantized model and its report; with `job.out` both are written there, atomically."""
    timings: dict[str, float] = {}
    recipe = job.recipe
    q = recipe.quant
    fp_model, data_config, qmodel = _load_prepared(job, timings, loaded)
    eval_folder = job.eval_data
    evalset = distributed.together(ImageFolder, eval_folder, data_config) if eval_folder is not None else None
    budget = Budget.from_config(recipe.mixed) if recipe.mixed.enabled else None
    if budget is not None:  # an impossible budget fails before synthesis or the sensitivity pass
        check_feasible(describe_layers(qmodel, recipe.mixed, q.first_last_bits), budget)
    calib, synth_meta, batches = calibration_data(fp_model, data_config, job, progress, timings)
    layerwise = needs_layerwise(recipe)
    if recipe.method is not Method.RTN or recipe.mixed.enabled or layerwise:
        batches = list(batches)  # used more than once: load and preprocess the images once
    table = allocation = None
    if recipe.mixed.enabled:
        with _timed(timings, "sensitivity"):
            table, allocation = mixed_bits(qmodel, batches, job.model, recipe, budget, job.sensitivity_file, progress)
    with _timed(timings, "calibrate"):
        calibrate(qmodel, batches, q, progress)  # under torchrun the ranges are computed once and shared
    if layerwise or recipe.method.reconstructs:
        batches = share(batches)  # data-parallel: each rank works on its share of the images
    rounding_summary, recon_summary = round_weights(qmodel, fp_model, batches, recipe, job.work_dir, progress, timings)
    mixed = None
    if allocation is not None:
        mixed = {"budget": budget.to_dict(), **allocation.to_dict()}
    report = Report(
        model=job.model,
        weights=qmodel.ptq_state.weights,
        method=recipe.method.value,
        w_bits="auto" if mixed else q.w_bits,
        a_bits=q.a_bits,
        bit_convention=q.first_last_bits.value,
        mixed=mixed,
        calibration={"data": job.calib_source, "images": len(calib), "synthetic": synth_meta},
        rounding=rounding_summary,
        reconstruction=recon_summary,
        device=str(job.device),
        processes=distributed.world().size,
    )
    if evalset is not None:
        with _timed(timings, "evaluate"):
            sums, fp_sums = run_metrics(
                qmodel, evalset, recipe.calib.batch_size, job.device, fp_model, recipe.calib.workers, progress,
                "compare with FP",
            )  # fmt: skip
        report.evaluation = {"data": str(eval_folder), "images": sums.images, **sums.summary()}
        report.fp_evaluation = {"top1": fp_sums.summary()["top1"], "top5": fp_sums.summary()["top5"]}
    fp_bytes = fp32_weight_bytes(fp_model)
    report.layers = {"quantized": len(quant_layers(qmodel)), "bits": layer_bits(qmodel)}
    report.timings_s = timings
    if job.out is not None and distributed.world().main:  # rank 0 writes the output
        with _timed(timings, "save"):
            write_output(job.out, qmodel, job.model, recipe, data_config, report, job.overwrite, fp_bytes,
                         job.checkpoint, table, allocation)  # fmt: skip
        shutil.rmtree(job.work_dir, ignore_errors=True)  # the output is complete: unit checkpoints are not needed
    else:
        report.size = _size(fp_bytes, packed_bytes(qmodel))
    return qmodel, distributed.broadcast_object(report if distributed.world().main else None)


def write_output(
    out: Path,
    qmodel: nn.Module,
    model_name: str,
    recipe: Recipe,
    data_config: dict,
    report: Report,
    overwrite: bool = False,
    fp_bytes: int | None = None,
    checkpoint: Path | None = None,
    table: SensitivityTable | None = None,
    allocation: Allocation | None = None,
) -> None:
    """A `ptq quantize` output folder — packed checkpoint, quant_config.json, recipe.yaml, report.json (with the
    checkpoint's size filled in) and, for mixed precision, the sensitivity table — written atomically."""
    with staged_dir(out, overwrite) as stage:
        extra = {"mixed": report.mixed} if report.mixed else {}
        save_quantized(
            qmodel, stage, model_name, recipe.quant, data_config, checkpoint=str(checkpoint) if checkpoint else None,
            **extra,
        )  # fmt: skip
        fp_bytes = fp_bytes if fp_bytes is not None else (report.size or {}).get("fp32_bytes")
        report.size = _size(fp_bytes, (stage / WEIGHTS_FILE).stat().st_size)
        write_text(stage / "recipe.yaml", dump_recipe(recipe))
        if table is not None:
            write_json(stage / SENSITIVITY_FILE, {"table": table.to_dict(), "chosen": allocation.to_dict()})
        write_json(stage / "report.json", report.to_dict())


def _size(fp_bytes: int | None, q_bytes: int) -> dict[str, Any]:
    ratio = round(q_bytes / fp_bytes, 4) if fp_bytes else None
    return {"fp32_bytes": fp_bytes, "checkpoint_bytes": q_bytes, "ratio": ratio}


def sensitivity(
    job: Job, progress: Progress | None = None, loaded: tuple[nn.Module, dict] | None = None
) -> dict[str, Any]:
    """Per-layer sensitivity table, the Pareto front of (weight size, predicted KL) and the optimum under the
    budget (4 average bits when none is set), written to `job.out` as sensitivity.json, sensitivity.csv and
    sensitivity.png. `loaded`: a model (and its data config) already in memory."""
    timings: dict[str, float] = {}
    recipe = job.recipe
    mixed = recipe.mixed if recipe.mixed.has_budget else dataclasses.replace(recipe.mixed, avg_bits=4.0)
    budget = Budget.from_config(mixed)
    fp_model, data_config, qmodel = _load_prepared(job, timings, loaded)
    check_feasible(describe_layers(qmodel, mixed, recipe.quant.first_last_bits), budget)
    _, synth_meta, batches = calibration_data(fp_model, data_config, job, progress, timings)
    with _timed(timings, "sensitivity"):
        table = measure_sensitivity(qmodel, batches, job.model, recipe.quant, recipe.mixed, progress)
    with _timed(timings, "allocate"):
        chosen = allocate(table, budget)
        front = pareto_front(table)
    result = {
        "table": table.to_dict(),
        "budget": budget.to_dict(),
        "chosen": chosen.to_dict(),
        "uniform": {b: evaluate(table, table.uniform_bits(b)).to_dict() for b in table.candidates},
        "pareto_front": [{k: v for k, v in a.to_dict().items() if k != "bits"} for a in front],
        "calibration": {"data": job.calib_source, "images": table.images},
        "synthetic": synth_meta,
        "timings_s": timings,
        "device": str(job.device),
    }
    if not distributed.world().main:  # every rank measured the same table; rank 0 writes it
        return distributed.broadcast_object(None)
    with staged_dir(job.out, job.overwrite) as stage:
        write_json(stage / SENSITIVITY_FILE, result)
        write_text(stage / "sensitivity.csv", sensitivity_csv(table, chosen))
        plot_sensitivity(table, front, chosen, stage / "sensitivity.png")
        write_text(stage / "recipe.yaml", dump_recipe(recipe))
    return distributed.broadcast_object(result)


def round_weights(
    qmodel: nn.Module,
    fp_model: nn.Module,
    batches: list[torch.Tensor],
    recipe: Recipe,
    work_dir: str | Path | None = None,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
    synthetic: bool = False,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Everything after calibration that decides the weights of a calibrated model, in place: the layer-wise pass
    (GPTQ and/or bias correction) and reconstruction, as the recipe asks. Returns their summaries (or None).
    `synthetic`: the batches are synthetic images (what `quant.bias_correction=auto` chooses by)."""
    timings = {} if timings is None else timings
    recipe = resolve_bias_correction(recipe, synthetic)
    q = recipe.quant
    layerwise = needs_layerwise(recipe)
    skipped = over_budget(qmodel, recipe.recon) if recipe.method.reconstructs else None
    reconstructs = recipe.method.reconstructs and skipped is None
    # the FP targets of reconstruction, taken before the layer-wise pass changes weights and biases
    reference = fp_reference(qmodel) if reconstructs else None
    rounding_summary = recon_summary = starts = None
    if layerwise:
        with _timed(timings, "round"):
            rounding_summary, starts = round_layers(
                qmodel, batches, layerwise, recipe.gptq, q.bias_correction, reference, work_dir, progress,
                analytic_means=_analytic_means(qmodel, fp_model, q, batches),
            )  # fmt: skip
    if skipped is not None:
        log.info("reconstruction skipped: %s", skipped["reason"])
        recon_summary = skipped
    if reconstructs:
        context = {"quant": to_plain(q.__dict__), "gptq": to_plain(recipe.gptq.__dict__), "bits": layer_bits(qmodel)}
        with _timed(timings, "reconstruct"):
            recon_summary = reconstruct(
                qmodel, batches, recipe.method, recipe.recon, work_dir, progress, reference, starts, context
            )
    return rounding_summary, recon_summary


def over_budget(qmodel: nn.Module, recon: ReconConfig) -> dict[str, Any] | None:
    """Why reconstruction is skipped (its estimated work, 3 × MACs per image × batch × iterations, exceeds
    `recon.budget_gmacs`), or None when it runs."""
    if recon.budget_gmacs is None:
        return None
    gmacs = 3 * sum(layer_macs(qmodel).values()) * recon.batch_size * recon.iters / 1e9
    if gmacs <= recon.budget_gmacs:
        return None
    return {
        "skipped": True,
        "estimated_gmacs": round(gmacs, 1),
        "budget_gmacs": recon.budget_gmacs,
        "reason": f"its estimated {gmacs:.0f} GMAC exceed recon.budget_gmacs={recon.budget_gmacs:g}",
    }


def needs_layerwise(recipe: Recipe) -> Rounding | None:
    """The layer-wise pass a recipe asks for before any reconstruction: GPTQ (`--method gptq`, or reconstruction
    started from it), or round-to-nearest for bias correction alone; None when there is none."""
    if recipe.method is Method.GPTQ or (recipe.method.reconstructs and recipe.recon.init is RoundingInit.GPTQ):
        return Rounding.GPTQ
    return Rounding.NEAREST if recipe.quant.bias_correction is not BiasCorrection.OFF else None


def _analytic_means(qmodel: nn.Module, fp_model: nn.Module, q, batches) -> dict[str, torch.Tensor] | None:
    if q.bias_correction is not BiasCorrection.ANALYTIC:
        return None
    return analytic_input_means(qmodel, fp_model, batches[0][:1])
