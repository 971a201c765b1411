"""The Python front door: `quantize`, `synthesize`, `evaluate` and `load_quantized`, on timm names or models in
memory. The `ptq` command runs the same jobs.

    import ptq, timm
    model = timm.create_model("resnet18", pretrained=True)
    qmodel = ptq.quantize(model, calib="zero-shot", w_bits=4, a_bits=8)
    logits = qmodel(images)                 # called like the model it came from
    qmodel.save("runs/resnet18-w4a8")       # the folder `ptq quantize` writes
    again = ptq.load_quantized("runs/resnet18-w4a8")
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ptq.config import (
    DEFAULT_RECIPE,
    ConfigError,
    QuantConfig,
    Recipe,
    bit_values,
    build_config,
    keyword_names,
    load_recipe,
    with_values,
)
from ptq.export import checkpoint as _checkpoint
from ptq.models import ModelLoadError, load_model
from ptq.report import Report

Progress = Callable[..., None]


class QuantizedModel(nn.Module):
    """A quantized model, called like the model it came from, with what made it: `name` (timm architecture),
    `data_config` (input size, mean/std, crop), `recipe` and `report` (a `Report`: timings, sizes, fidelity, what
    `report.json` holds; None for a folder saved without one)."""

    def __init__(
        self,
        module: nn.Module,
        name: str,
        data_config: dict,
        recipe: Recipe | None = None,
        report: Report | None = None,
        checkpoint: str | None = None,
    ):
        super().__init__()
        self.module = module
        self.name = name
        self.data_config = data_config
        self.recipe = recipe
        self.report = report
        self.checkpoint = checkpoint

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @property
    def bits(self) -> dict[str, dict[str, int | None]]:
        """Per quantized layer: weight bits and input-quantizer bits."""
        from ptq.quant.prepare import layer_bits

        return layer_bits(self.module)

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the folder `ptq quantize` writes (packed checkpoint, quant_config.json, recipe.yaml, report.json),
        atomically; an existing non-empty folder is replaced only with `overwrite`."""
        from ptq.pipeline import write_output

        folder = Path(folder)
        recipe = self.recipe or Recipe(quant=build_config(QuantConfig, self.module.quant_meta["quant"], "quant."))
        report = copy.deepcopy(self.report) if self.report is not None else self._bare_report(recipe)
        write_output(folder, self.module, self.name, recipe, self.data_config, report, overwrite,
                     checkpoint=self.checkpoint)  # fmt: skip
        return folder

    def _bare_report(self, recipe: Recipe) -> Report:
        q = recipe.quant
        return Report(model=self.name, weights=None, method=recipe.method.value, w_bits=q.w_bits, a_bits=q.a_bits,
                      bit_convention=q.first_last_bits.value, calibration={}, device="cpu")  # fmt: skip


def default_device(device: str | None = None) -> str:
    """`device`, or cuda when available, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _name_of(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _data_config_of(model: nn.Module, data_config: dict | None) -> dict:
    if data_config is not None:
        if "input_size" not in data_config:
            raise ConfigError("data_config needs at least input_size, e.g. {'input_size': (3, 224, 224)}")
        from timm.data import resolve_data_config

        return resolve_data_config(args=dict(data_config), model=model)
    if not getattr(model, "pretrained_cfg", None):
        raise ConfigError(
            f"{type(model).__name__} is not a timm model, so its input is unknown: pass data_config="
            "{'input_size': (3, H, W), 'mean': (...), 'std': (...)}"
        )
    from timm.data import resolve_model_data_config

    return resolve_model_data_config(model)


def _images(calib: torch.Tensor | Iterable, limit: int) -> Dataset:
    """Preprocessed images from a tensor (N, C, H, W) or an iterable of batches (tensors, or tuples whose first
    element is the images, as a DataLoader of (image, label) yields); at most `limit` are read."""
    if isinstance(calib, torch.Tensor):
        if calib.ndim != 4:
            raise ConfigError(f"calibration images must be a (N, C, H, W) tensor, got shape {tuple(calib.shape)}")
        images = calib[:limit]
    else:
        parts, count = [], 0
        for batch in calib:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                raise ConfigError("a calibration loader must yield image batches (N, C, H, W) or (images, labels)")
            parts.append(x[: limit - count].cpu())
            count += parts[-1].shape[0]
            if count >= limit:
                break
        if not parts:
            raise ConfigError("the calibration loader yielded no images")
        images = torch.cat(parts)
    return TensorDataset(images.float().cpu(), torch.full((images.shape[0],), -1))


def _recipe(recipe: str | Path | Recipe, zero_shot: bool, overrides: dict[str, Any]) -> Recipe:
    """The recipe with the keyword overrides applied as typed values (see `keyword_names`): `bits`, `w_bits` and
    `a_bits` as on the command line (`"auto"` for mixed precision), `num_images` for the synthetic set (zero-shot)
    or the calibration subset."""
    base = recipe if isinstance(recipe, Recipe) else load_recipe(str(recipe))
    overrides = dict(overrides)
    values = bit_values(overrides.pop("bits", None), overrides.pop("w_bits", None), overrides.pop("a_bits", None))
    num_images = overrides.pop("num_images", None)
    if num_images is not None:
        values["synth.num_images" if zero_shot else "calib.num_images"] = num_images
    names = keyword_names()
    for key, value in overrides.items():
        if key not in names:
            close = sorted(n for n in names if key in n or n in key)[:4]
            hint = f"; did you mean {', '.join(close)}" if close else "; ptq.keyword_names() lists them"
            raise ConfigError(f"unknown option {key!r}{hint}")
        values[names[key]] = value
    return with_values(base, values)


def _is_zero_shot(calib: Any) -> bool:
    return isinstance(calib, str) and calib == "zero-shot"


def _job(
    model: str | nn.Module,
    calib: str | Path | torch.Tensor | Iterable,
    resolved: Recipe,
    device: str,
    data_config: dict | None,
    checkpoint: str | Path | None,
    real_images: str | Path | None,
    **fields: Any,
):
    """The pipeline's job for a model (name or module) and a calibration source, with the model already loaded
    when it was given in memory (else None: the job loads it, once per process group under torchrun)."""
    from ptq.pipeline import Job

    if calib is None:
        raise ConfigError("calib is needed: a folder of images, a tensor, a DataLoader, or 'zero-shot'")
    zero_shot = _is_zero_shot(calib)
    folder = images = None
    if isinstance(calib, (str, Path)) and not zero_shot:
        folder = Path(calib)
    elif not zero_shot:
        images = _images(calib, resolved.calib.num_images)
    if zero_shot and real_images is not None:
        folder = Path(real_images)
    name, loaded = _loaded(model, checkpoint, data_config, device)
    job = Job(name, resolved, calib_data=folder, images=images, zero_shot=zero_shot, checkpoint=checkpoint,
              device=device, **fields)  # fmt: skip
    return job, loaded


def _loaded(
    model: str | nn.Module, checkpoint: str | Path | None, data_config: dict | None, device: str
) -> tuple[str, tuple[nn.Module, dict] | None]:
    """(name, None) for a timm name; (name, (FP copy on `device`, data config)) for a model in memory."""
    if isinstance(model, str):
        return model, None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a timm name or an nn.Module, got {type(model).__name__}")
    if checkpoint is not None:
        raise ConfigError("checkpoint= loads weights for a timm name; load them into the model you pass instead")
    fp = copy.deepcopy(model).eval().to(device)
    fp.ptq_weights_source = "in-memory model"
    return _name_of(model), (fp, _data_config_of(model, data_config))


def quantize(
    model: str | nn.Module,
    calib: str | Path | torch.Tensor | Iterable,
    *,
    recipe: str | Path | Recipe = DEFAULT_RECIPE,
    data_config: dict | None = None,
    eval_data: str | Path | None = None,
    checkpoint: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    progress: Progress | None = None,
    synth_data: str | Path | None = None,
    sensitivity: str | Path | None = None,
    real_images: str | Path | None = None,
    **overrides: Any,
) -> QuantizedModel:
    """Quantize `model` (a timm name, or any timm model or CNN in memory; the original is left untouched).

    `calib`: a folder of images (preprocessed with the model's data config), a tensor of preprocessed images
    (N, C, H, W), a DataLoader (or any iterable) of such batches, or `"zero-shot"` to synthesize images from the
    model's BatchNorm statistics. `recipe`: a shipped recipe's name, a YAML file or a `Recipe`; `overrides` set
    recipe values by keyword, typed and checked like a recipe file: `bits`, `w_bits`, `a_bits` (`"auto"`: weight
    bits per layer under `mixed_size_budget` / `mixed_avg_bits`), `method`, `num_images`, any quantization field by
    name (`bias_correction="analytic"`) and any other as `section_field` (`synth_iters=200`, `recon_iters=2000`).
    `data_config` is needed for a model that is not from timm. With `out`, the output folder is written as by
    `ptq quantize` and an interrupted run resumes when called again; `eval_data` adds an FP-vs-quantized report.
    `synth_data`: a folder to keep (or reuse) the synthetic set in; `real_images`: the few real images FDDA
    synthesizes from (zero-shot with `synth_method="fdda"`); `sensitivity`: a table made by `ptq sensitivity` to
    reuse for `w_bits="auto"`.
    """
    from ptq.pipeline import quantize as run_job

    resolved = _recipe(recipe, _is_zero_shot(calib), overrides)
    device = default_device(device)
    job, loaded = _job(model, calib, resolved, device, data_config, checkpoint, real_images, synth_data=synth_data,
                       eval_data=eval_data, out=out, sensitivity_file=sensitivity, overwrite=overwrite)  # fmt: skip
    qmodel, report = run_job(job, progress, loaded)
    data_config = qmodel.ptq_state.data_config
    return QuantizedModel(qmodel, job.model, data_config, job.recipe, report, str(checkpoint) if checkpoint else None)


def synthesize(
    model: str | nn.Module,
    num_images: int | None = None,
    *,
    method: str | None = None,
    recipe: str | Path | Recipe = DEFAULT_RECIPE,
    data_config: dict | None = None,
    checkpoint: str | Path | None = None,
    real_images: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> torch.Tensor:
    """Calibration images synthesized from the model's BatchNorm statistics (preprocessed, as the model takes
    them): `num_images` of them (default: the recipe's), with the recipe's synthesis settings (`method`: intraq,
    genie, fdda, ...; `synth_iters=`, `synth_lr=`, `synth_seed=`, ...). The set is kept in `out` or in the cache,
    keyed by model, weights and settings: a second call returns it at once and an interrupted one resumes; a
    folder holding a set made with other settings is replaced only with `overwrite`. `real_images`: the folder of
    real images FDDA starts from (one per class is enough)."""
    from ptq.synth import SyntheticSet

    folder, _ = synthesize_folder(model, num_images, method=method, recipe=recipe, data_config=data_config,
                                  checkpoint=checkpoint, real_images=real_images, out=out, overwrite=overwrite,
                                  device=device, progress=progress, **overrides)  # fmt: skip
    images = SyntheticSet(folder).images
    return images if num_images is None else images[:num_images]


def synthesize_folder(
    model: str | nn.Module,
    num_images: int | None = None,
    *,
    method: str | None = None,
    recipe: str | Path | Recipe = DEFAULT_RECIPE,
    data_config: dict | None = None,
    checkpoint: str | Path | None = None,
    real_images: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> tuple[Path, dict[str, Any]]:
    """`synthesize`, returning the set's folder and its metadata (timings, losses, resumed batches) instead of
    the images: what `ptq synthesize` prints."""
    from ptq import distributed
    from ptq.calibration import default_synth_dir, synthesize_set
    from ptq.models import weights_digest

    if method is not None:
        overrides["synth_method"] = method
    if num_images is not None:
        overrides["num_images"] = num_images
    resolved = _recipe(recipe, True, overrides)
    device = default_device(device)
    name, loaded = _loaded(model, checkpoint, data_config, device)
    if loaded is None:
        loaded = distributed.together(load_model, name, checkpoint=checkpoint, device=device)
    fp, config = loaded
    folder = Path(out) if out is not None else default_synth_dir(name, config, resolved, weights_digest(fp))
    # the synthesizer checks the folder (a set made with other settings is refused unless `overwrite`)
    meta, _ = synthesize_set(fp, name, config, resolved, folder, real_images, device, overwrite, progress)
    return folder, meta


def sensitivity(
    model: str | nn.Module,
    calib: str | Path | torch.Tensor | Iterable,
    *,
    out: str | Path,
    recipe: str | Path | Recipe = "rtn",
    data_config: dict | None = None,
    checkpoint: str | Path | None = None,
    synth_data: str | Path | None = None,
    real_images: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Per-layer Hessian sensitivity of the model's loss to each weight width, the Pareto front of weight size vs
    predicted KL, and the best allocation under a budget (`mixed_size_budget=`, `mixed_avg_bits=`,
    `mixed_bops_budget=`; default 4 bits per weight on average), written to `out` (sensitivity.json, .csv, .png)
    and returned as the dict sensitivity.json holds. `calib` as for `quantize`; `num_images` sets how many images
    the measurement uses. The table is what `quantize(..., w_bits="auto", sensitivity=out)` reuses."""
    from ptq.pipeline import sensitivity as run_sensitivity

    zero_shot = _is_zero_shot(calib)
    if overrides.get("num_images") is not None and "mixed_images" not in overrides:
        overrides["mixed_images"] = overrides["num_images"]
    resolved = _recipe(recipe, zero_shot, overrides)
    device = default_device(device)
    job, loaded = _job(model, calib, resolved, device, data_config, checkpoint, real_images, synth_data=synth_data,
                       out=out, overwrite=overwrite)  # fmt: skip
    return run_sensitivity(job, progress, loaded)


@dataclasses.dataclass
class Result:
    """One evaluated model: accuracy against labels (when the folder has class folders), and, for quantized
    models, top-1 agreement, KL(FP‖Q) and logit SQNR against the FP model; `error` when it could not run."""

    model: str
    kind: str
    top1: float | None = None
    top5: float | None = None
    agreement: float | None = None
    kl: float | None = None
    sqnr_db: float | None = None
    images: int | None = None
    seconds: float | None = None
    error: str | None = None


def evaluate(
    models: str | Path | nn.Module | list,
    data: str | Path,
    *,
    batch_size: int = 32,
    device: str | None = None,
    progress: Progress | None = None,
) -> list[Result]:
    """Evaluate models side by side on a folder of images, each with its own preprocessing: timm names (wildcards
    expand), `ptq quantize` output folders and exported `.onnx` files (compared with their FP parent), and models in
    memory. A `QuantizedModel` is compared with its architecture's pretrained (or `checkpoint`) weights, or with
    the FP model given with it as a pair `(qmodel, fp_model)`; any other module is evaluated as it is."""
    from ptq.data import find_images
    from ptq.eval.harness import evaluate as run_specs
    from ptq.eval.harness import measure, row_for

    device = default_device(device)
    find_images(data)
    items = models if isinstance(models, list) else [models]
    results = []
    for item in items:
        if isinstance(item, (str, Path)):
            rows = run_specs([str(item)], data, batch_size, device, progress=progress)
        else:
            model, fp_model = item if isinstance(item, tuple) else (item, None)
            note = None
            if isinstance(model, QuantizedModel):
                name, kind, config = model.name, "quantized", model.data_config
                if fp_model is None:
                    try:
                        fp_model, _ = load_model(model.name, checkpoint=model.checkpoint, device=device)
                    except ModelLoadError as e:  # still report accuracy; fidelity needs the parent
                        note = f"FP parent unavailable, no agreement/KL/SQNR (pass (qmodel, fp_model)): {e}"
            elif isinstance(model, nn.Module):
                name, kind, config = _name_of(model), "fp", _data_config_of(model, None)
            else:
                raise ConfigError(f"cannot evaluate a {type(model).__name__}: pass names, folders, files or modules")
            module = model.to(device).eval()
            fp = fp_model.to(device).eval() if fp_model is not None else None
            row = row_for(name, kind) | {"error": note}
            rows = [measure(row, lambda m=module, c=config, f=fp: (m, c, f), data, batch_size, device,
                            progress=progress)]  # fmt: skip
        results += [Result(**row) for row in rows]
    return results


def load_quantized(
    folder: str | Path, device: str | torch.device = "cpu", model: nn.Module | None = None
) -> QuantizedModel:
    """A folder written by `ptq quantize` (or `QuantizedModel.save`) as a `QuantizedModel`; its outputs equal the
    saved model's. `model`: the FP architecture to rebuild on, for a model that is not from timm."""
    import json

    folder = Path(folder)
    module = _checkpoint.load_quantized(folder, device, architecture=model)
    meta = module.quant_meta
    report_file = folder / "report.json"
    report = Report.from_dict(json.loads(report_file.read_text())) if report_file.is_file() else None
    recipe_file = folder / "recipe.yaml"
    recipe = load_recipe(str(recipe_file)) if recipe_file.is_file() else None
    return QuantizedModel(
        module, meta["model"], _checkpoint.data_config_from(meta), recipe, report, meta.get("checkpoint")
    )
