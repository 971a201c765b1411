"""The calibration set of a job, whatever its source: a folder of real images (a seeded subset), preprocessed images
in memory, or a zero-shot synthetic set — reused from a folder or the cache, grown, or synthesized resumably; FDDA's
real images joined to it; and, under torchrun, each rank's share of it for the passes that split the data."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from ptq import distributed
from ptq.config import ConfigError, Recipe, SynthMethod
from ptq.data import calibration_set, image_batches, make_loader
from ptq.models import cache_dir, weights_digest
from ptq.synth import SynthError, SyntheticSet, class_statistics, synthesize
from ptq.synth.run import fingerprint as synth_fingerprint
from ptq.synth.shards import META_FILE

if TYPE_CHECKING:
    from ptq.pipeline import Job

log = logging.getLogger(__name__)
Progress = Callable[..., None]


def calibration_images(
    fp_model: nn.Module, data_config: dict, job: Job, progress: Progress | None = None
) -> tuple[Dataset, dict[str, Any] | None]:
    """The calibration set of a job: real images (a folder's seeded subset, or the first of the in-memory ones), or
    (zero-shot) a synthetic set reused from `synth_data` or the cache when finished, else synthesized (resumably);
    with the synthetic set's metadata (or None)."""
    recipe, device = job.recipe, job.device
    if job.images is not None:
        return Subset(job.images, range(min(len(job.images), recipe.calib.num_images))), None
    if not job.zero_shot:
        num, seed = recipe.calib.num_images, recipe.calib.seed
        return distributed.together(calibration_set, job.calib_data, data_config, num, seed), None
    digest = weights_digest(fp_model)
    cached = job.synth_data is None
    folder = job.synth_data or default_synth_dir(job.model, data_config, recipe, digest)
    return _synthetic_calibration(
        fp_model, job.model, data_config, recipe, folder, job.calib_data, device, progress, cached, digest
    )


def batches_of(calib: Dataset, recipe: Recipe, device: str | torch.device) -> Iterable[torch.Tensor]:
    """The set's image batches on `device`, with a length (for progress)."""
    loader = make_loader(calib, recipe.calib.batch_size, recipe.calib.workers, device)
    return _counted(image_batches(loader, device), len(loader))


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
            raise SynthError(
                "fdda needs a few real images (one per class is enough): pass --calib-data DIR "
                "(in Python: real_images=DIR)"
            )
        real, labels = real_images(calib_data, data_config, recipe.calib.num_images, recipe.calib.seed)
        class_stats = class_statistics(fp_model, real.to(device), labels.to(device) if labels is not None else None)
    meta = synthesize(fp_model, model_name, data_config, recipe.synth, out, device, class_stats, overwrite, progress)
    return meta, real


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


def share(batches: list[torch.Tensor]) -> list[torch.Tensor]:
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
