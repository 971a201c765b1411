"""The jobs behind the commands. `quantize`: load → prepare → (synthesize) → (sensitivity and bit allocation, for
`--bits auto`) → calibrate → (reconstruct) → compare with FP → write a packed checkpoint, atomically. `sensitivity`:
the per-layer table, Pareto front and plot only. `synthesize_set`: a synthetic calibration set in a folder.

`OUT/` receives `model.safetensors` (packed integer weights), `quant_config.json`, `recipe.yaml` (resolved) and
`report.json` (timings, sizes, fidelity). Everything is written into a staging folder first and moved into place only
when complete, so an interrupted run leaves no half-written `OUT`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from ptq import distributed
from ptq._io import check_output_dir, staged_dir, write_json, write_text
from ptq.config import (
    BiasCorrection,
    ConfigError,
    Method,
    Recipe,
    RoundingInit,
    SynthMethod,
    check_job_recipe,
    dump_recipe,
    to_plain,
)
from ptq.data import DataError, ImageFolder, calibration_set, image_batches, make_loader
from ptq.eval.harness import run_metrics
from ptq.export.checkpoint import WEIGHTS_FILE, fp32_weight_bytes, packed_bytes, save_quantized
from ptq.mixed import Allocation, Budget, SensitivityTable, allocate, apply_bits, measure_sensitivity, pareto_front
from ptq.mixed.allocate import check_feasible, evaluate
from ptq.mixed.plot import plot_sensitivity
from ptq.mixed.sensitivity import describe_layers
from ptq.models import cache_dir, load_model, weights_digest
from ptq.quant import calibrate, prepare
from ptq.quant.modules import quant_layers
from ptq.quant.prepare import layer_bits
from ptq.recon.analytic import analytic_input_means
from ptq.recon.engine import fp_reference
from ptq.recon.layerwise import Rounding, round_layers
from ptq.recon.run import reconstruct
from ptq.report import Report
from ptq.synth import SynthError, SyntheticSet, class_statistics, synthesize
from ptq.synth.run import fingerprint as synth_fingerprint
from ptq.synth.shards import META_FILE

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int | None], None]
SENSITIVITY_FILE = "sensitivity.json"


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


def real_images(
    folder: str | Path, data_config: dict, num_images: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Up to `num_images` real images as one tensor, with their class-folder labels when the folder has them."""
    subset = calibration_set(folder, data_config, num_images, seed)
    images, labels = zip(*(subset[i] for i in range(len(subset))), strict=True)
    labels = torch.tensor(labels)
    return torch.stack(images), (labels if bool((labels >= 0).all()) else None)


def default_synth_dir(model_name: str, data_config: dict, recipe: Recipe, weights: str) -> Path:
    """The cache folder of a zero-shot run's synthetic set, keyed by model, weights, input and settings."""
    return cache_dir() / "synth" / f"{model_name}-{synth_fingerprint(model_name, data_config, recipe.synth, weights)}"


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


def calibration_data(
    fp_model: nn.Module, data_config: dict, job: Job, progress: Progress | None, timings: dict[str, float]
) -> tuple[Dataset, dict[str, Any] | None, Iterable[torch.Tensor]]:
    """The calibration set: real images (a folder's seeded subset, or the first of the in-memory ones), or
    (zero-shot) a synthetic set that is reused from `synth_data` or the cache when finished, else synthesized
    (resumably); with the synthetic set's metadata (or None) and the set's batches on the job's device."""
    recipe, device = job.recipe, job.device
    with _timed(timings, "synthesize" if job.zero_shot else "load"):
        if job.images is not None:
            calib, meta = Subset(job.images, range(min(len(job.images), recipe.calib.num_images))), None
        elif not job.zero_shot:
            num, seed = recipe.calib.num_images, recipe.calib.seed
            calib, meta = distributed.together(calibration_set, job.calib_data, data_config, num, seed), None
        else:
            digest = weights_digest(fp_model)
            cached = job.synth_data is None
            folder = job.synth_data or default_synth_dir(job.model, data_config, recipe, digest)
            calib, meta = _synthetic_calibration(
                fp_model, job.model, data_config, recipe, folder, job.calib_data, device, progress, cached, digest
            )
    loader = make_loader(calib, recipe.calib.batch_size, recipe.calib.workers, device)
    return calib, meta, _counted(image_batches(loader, device), len(loader))


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


def read_sensitivity(path: str | Path, model_name: str, qmodel: nn.Module, recipe: Recipe) -> SensitivityTable:
    """A table written by `ptq sensitivity` (its folder or its JSON), checked against the model and the recipe."""
    path = Path(path)
    path = path / SENSITIVITY_FILE if path.is_dir() else path
    try:
        table = SensitivityTable.from_dict(json.loads(path.read_text())["table"])
    except FileNotFoundError:
        raise DataError(f"--sensitivity {path} does not exist; point at a folder made by `ptq sensitivity`") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"--sensitivity {path} is not a sensitivity table ({e}); re-run `ptq sensitivity`") from None
    if table.model != model_name or [layer.name for layer in table.layers] != list(quant_layers(qmodel)):
        raise DataError(f"--sensitivity {path} was measured on {table.model}, not on {model_name} as prepared here")
    # the widths allowed now (recipe, hardware limits) may differ from when the table was made
    fresh = {layer.name: layer.allowed for layer in describe_layers(qmodel, recipe.mixed, recipe.quant.first_last_bits)}
    for layer in table.layers:
        missing = set(fresh[layer.name]) - set(layer.perturbation)
        if missing:
            raise DataError(
                f"--sensitivity {path} lacks {sorted(missing)}-bit values for {layer.name}; re-run `ptq sensitivity` "
                "with the same mixed.w_candidates"
            )
        layer.allowed = fresh[layer.name]
    table.convention = recipe.quant.first_last_bits
    return table


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
    eval_folder = job.eval_data or job.calib_data
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
        batches = _share(batches)  # data-parallel: each rank works on its share of the images
    rounding_summary, recon_summary = round_weights(qmodel, fp_model, batches, recipe, job.work_dir, progress, timings)
    mixed = None
    if allocation is not None:
        mixed = {"budget": budget.to_dict(), **allocation.to_dict()}
    report = Report(
        model=job.model,
        weights=getattr(fp_model, "ptq_weights_source", None),
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


def sensitivity(job: Job, progress: Progress | None = None) -> dict[str, Any]:
    """Per-layer sensitivity table, the Pareto front of (weight size, predicted KL) and the optimum under the
    budget (4 average bits when none is set), written to `job.out` as sensitivity.json, sensitivity.csv and
    sensitivity.png."""
    timings: dict[str, float] = {}
    recipe = job.recipe
    mixed = recipe.mixed if recipe.mixed.has_budget else dataclasses.replace(recipe.mixed, avg_bits=4.0)
    budget = Budget.from_config(mixed)
    fp_model, data_config, qmodel = _load_prepared(job, timings, None)
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


def sensitivity_csv(table: SensitivityTable, chosen: Allocation) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    widths = table.candidates
    writer.writerow(
        ["layer", "kind", "params", "channels", "macs", "in_bits", "trace", "chosen_bits"]
        + [f"omega_w{b}" for b in widths]
    )
    for layer in table.layers:
        writer.writerow(
            [layer.name, layer.kind.value, layer.numel, layer.channels, layer.macs, layer.in_bits, f"{layer.trace:.6g}"]
            + [chosen.bits[layer.name]]
            + [f"{layer.omega(b):.6g}" if b in layer.perturbation else "" for b in widths]
        )
    return buffer.getvalue()


def round_weights(
    qmodel: nn.Module,
    fp_model: nn.Module,
    batches: list[torch.Tensor],
    recipe: Recipe,
    work_dir: str | Path | None = None,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Everything after calibration that decides the weights of a calibrated model, in place: the layer-wise pass
    (GPTQ and/or bias correction) and reconstruction, as the recipe asks. Returns their summaries (or None)."""
    timings = {} if timings is None else timings
    q = recipe.quant
    layerwise = needs_layerwise(recipe)
    # the FP targets of reconstruction, taken before the layer-wise pass changes weights and biases
    reference = fp_reference(qmodel) if recipe.method.reconstructs else None
    rounding_summary = recon_summary = starts = None
    if layerwise:
        with _timed(timings, "round"):
            rounding_summary, starts = round_layers(
                qmodel, batches, layerwise, recipe.gptq, q.bias_correction, reference, work_dir, progress,
                analytic_means=_analytic_means(qmodel, fp_model, q, batches),
            )  # fmt: skip
    if recipe.method.reconstructs:
        context = {"quant": to_plain(q.__dict__), "gptq": to_plain(recipe.gptq.__dict__), "bits": layer_bits(qmodel)}
        with _timed(timings, "reconstruct"):
            recon_summary = reconstruct(
                qmodel, batches, recipe.method, recipe.recon, work_dir, progress, reference, starts, context
            )
    return rounding_summary, recon_summary


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


def _synthetic_calibration(
    fp_model, model_name, data_config, recipe, folder, calib_data, device, progress, cached: bool, digest: str
):
    """The calibration set of a zero-shot run: a finished set in `folder` reused, else synthesized (resumed). A set
    the user named (`--synth-data`) is used whole; the cache's set serves the first `synth.num_images` images and
    is grown (its batches depend on the seed and batch index only) when it holds fewer."""
    wanted = recipe.synth.num_images
    if (folder / META_FILE).is_file():
        try:
            synthetic = SyntheticSet(folder)
        except FileNotFoundError:
            synthetic = None  # unfinished or damaged: synthesize resumes it below
        if synthetic is not None and cached and len(synthetic) < wanted:
            synthetic = None  # too small: synthesize grows it below
        if synthetic is not None:
            made_for = (synthetic.meta.get("model"), list(synthetic.meta["data_config"]["input_size"]))
            if made_for != (model_name, list(data_config["input_size"])):
                raise SynthError(f"--synth-data {folder} was made for {made_for[0]} at {made_for[1]}; synthesize anew")
            if synthetic.meta.get("weights", digest) != digest:
                raise SynthError(
                    f"--synth-data {folder} was made from other weights of {model_name}; synthesize anew for these "
                    "(or pass the --checkpoint it was made from)"
                )
            log.info("reusing the synthetic set in %s", folder)
            real = None
            if recipe.synth.method is SynthMethod.FDDA and calib_data is not None:
                real, _ = real_images(calib_data, data_config, recipe.calib.num_images, recipe.calib.seed)
            brief = {"folder": str(folder), **_brief(synthetic.meta)}
            if cached and len(synthetic) > wanted:
                synthetic, brief["num_images"] = Subset(synthetic, range(wanted)), wanted
            return _with_real(synthetic, real), brief
    meta, real = synthesize_set(fp_model, model_name, data_config, recipe, folder, calib_data, device, False, progress)
    if not (folder / META_FILE).is_file():  # rank 0 finished it, on a filesystem this rank does not see
        raise SynthError(
            f"rank {distributed.world().rank} cannot see the synthetic set in {folder}: on several machines put it "
            "on a filesystem they share (--synth-data DIR, or PTQ_CACHE_DIR)"
        )
    return _with_real(SyntheticSet(folder), real), {"folder": str(folder), **_brief(meta)}


def _with_real(synthetic: Dataset, real: torch.Tensor | None) -> Dataset:
    """FDDA: the real images join the synthetic ones in the calibration set."""
    if real is None:
        return synthetic
    return ConcatDataset([synthetic, TensorDataset(real, torch.full((real.shape[0],), -1))])


def _brief(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in ("method", "num_images", "fingerprint", "seconds", "resumed_batches")}


def _share(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's contiguous share of the calibration images (all of them for one process), as batches of the
    same size, copied so that the rest can be freed."""
    w = distributed.world()
    if not w.distributed:
        return batches
    images = torch.cat(batches)
    if images.shape[0] < w.size:
        raise ConfigError(f"{images.shape[0]} calibration images cannot be shared by {w.size} processes; use more")
    mine = w.shard(images.shape[0])
    size = batches[0].shape[0]
    return [images[i : min(i + size, mine.stop)].clone() for i in range(mine.start, mine.stop, size)]


def _counted(iterable, n: int):
    """Give a generator a length so that progress can show a total."""

    class _Sized:
        def __iter__(self):
            return iter(iterable)

        def __len__(self):
            return n

    return _Sized()
