"""`synthesize(...)`: make (or resume) a synthetic calibration set in a folder.

Rerunning the same command after an interruption keeps every valid finished shard and continues; the set is
identical to an uninterrupted run with the same seed, whatever the number of processes of either run (torchrun).
A folder holding a set made with other settings is refused unless `overwrite`. Metadata (model, method, resolved
settings, per-batch final losses) and a preview grid are written once all shards exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptq import distributed
from ptq._io import OutputError, atomic_path, write_json
from ptq.config import SynthConfig, to_plain
from ptq.models import weights_digest
from ptq.synth.shards import META_FILE, PREVIEW_FILE, read_shard, shard_path, write_shard
from ptq.synth.synthesizer import ClassStatistics, Synthesizer

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int | None], None]
FORMAT_VERSION = 1


def fingerprint(model_name: str, data_config: dict, config: SynthConfig, weights: str) -> str:
    """Everything that changes a batch's content — the model's weights (`ptq.models.weights_digest`) included;
    num_images is left out so that a set can grow."""
    settings = {k: v for k, v in to_plain(config.__dict__).items() if k != "num_images"}
    key = {
        "model": model_name,
        "weights": weights,
        "input_size": list(data_config["input_size"]),
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
        "settings": settings,
        "version": FORMAT_VERSION,
    }
    if config.w_mdc > 0:  # batches see the class centres of earlier rounds (see `rounds`)
        key["centres"] = "doubling rounds"
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def batch_sizes(num_images: int, batch_size: int) -> list[int]:
    full, rest = divmod(num_images, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def check_synth_dir(out: Path, fp: str, overwrite: bool) -> None:
    """Fail before any work if `out` cannot be written or holds a set made with other settings."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; choose a folder path")
    existing = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise OutputError(f"--out {out} cannot be created or written ({existing} is not a writable folder)")
    if not out.is_dir():
        return  # nothing there yet: created when the first shard is written
    meta = out / META_FILE
    foreign = []
    if meta.is_file():
        try:
            if json.loads(meta.read_text()).get("fingerprint") != fp:
                foreign.append(meta)
        except json.JSONDecodeError:
            foreign.append(meta)
    others = [p for p in out.iterdir() if p.name not in (META_FILE, PREVIEW_FILE) and not p.name.startswith("shard_")]
    if foreign or others:
        if not overwrite:
            raise OutputError(
                f"--out {out} holds other files or a set made with other settings; choose another folder or --overwrite"
            )
        for p in out.iterdir():
            if p.is_file() and (p.name.startswith("shard_") or p.name in (META_FILE, PREVIEW_FILE)):
                p.unlink()


def rounds(num_batches: int, centred: bool) -> list[range]:
    """Batches that are made together. Without class centres, all of them. With them (IntraQ's MDC: a batch
    uses the centres of the images "generated so far"), batch i sees the batches of every earlier round, and rounds
    double in length — batch 0, 1, 2–3, 4–7, ... — so a batch sees at least half of the batches before it while a
    round's batches can be made in parallel, and the set does not depend on how many processes make it."""
    if not centred:
        return [range(num_batches)]
    out, start = [], 0
    while start < num_batches:
        out.append(range(start, min(max(2 * start, start + 1), num_batches)))
        start = out[-1].stop
    return out


def synthesize(
    model: nn.Module,
    model_name: str,
    data_config: dict,
    config: SynthConfig,
    out: str | Path,
    device: torch.device | str = "cpu",
    class_stats: ClassStatistics | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write (or complete) the synthetic set in `out`; return its metadata.

    Under torchrun the batches of each round are shared out across ranks (the round's k-th batch goes to rank
    k mod world size), each rank writes its own shards, the round's class-centre contributions are summed
    over ranks, and rank 0 writes the metadata and preview once every shard exists."""
    out = Path(out)
    w = distributed.world()
    digest = weights_digest(model)
    fp = fingerprint(model_name, data_config, config, digest)
    distributed.on_main(check_synth_dir, out, fp, overwrite)  # rank 0 checks (and clears, with overwrite)
    synth = Synthesizer(model, tuple(data_config["input_size"]), config, device, class_stats)
    if w.main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    sizes = batch_sizes(config.num_images, config.batch_size)
    schedule = [[i for i in r if (i - r.start) % w.size == w.rank] for r in rounds(len(sizes), synth.centred)]
    total_iters = sum(map(len, schedule)) * config.iters
    losses: dict[int, dict[str, float]] = {}
    resumed, start = 0, time.perf_counter()
    centres = synth.empty_centres()
    for mine in schedule:  # this rank's batches of each round
        synth.set_centres(centres)
        found = synth.empty_centres()  # what this rank's batches of the round add to the centres
        for index in mine:
            done = len(losses) * config.iters
            path = shard_path(out, index)
            shard = read_shard(path, fp)
            if shard is not None and shard[0]["images"].shape[0] == sizes[index]:
                contribution, losses[index] = shard[0], shard[1]["losses"]
                resumed += 1
                if progress is not None:
                    progress("synthesize", done + config.iters, total_iters)
            else:

                def step(it, done=done):
                    if progress is not None:
                        progress("synthesize", done + it, total_iters)

                batch = synth.batch(index, sizes[index], step)
                write_shard(path, index, fp, batch.images, batch.labels, batch.losses, batch.centres)
                contribution, losses[index] = batch.centres, batch.losses
                log.info("batch %d/%d: %s", index + 1, len(sizes), {k: round(v, 4) for k, v in batch.losses.items()})
            for key, value in found.items():
                if key in contribution and contribution[key].shape == value.shape:
                    value += contribution[key]
        if synth.centred:
            distributed.all_reduce_(list(found.values()))
            centres = {k: centres[k] + found[k] for k in centres}
    gathered = distributed.gather_objects((losses, resumed))
    meta = None
    if w.main:
        meta = {
            "format_version": FORMAT_VERSION,
            "model": model_name,
            "weights": digest,
            "method": config.method.value,
            "fingerprint": fp,
            "num_images": config.num_images,
            "num_batches": len(sizes),
            "data_config": data_config,
            "settings": to_plain(config.__dict__),
            "real_classes": class_stats.classes if class_stats is not None else None,
            "batch_losses": _in_order([part for part, _ in gathered], len(sizes)),
            "resumed_batches": sum(r for _, r in gathered),
            "seconds": round(time.perf_counter() - start, 2),
            "device": str(device),
            "processes": w.size,
        }
        _finish(out, fp, len(sizes), data_config, meta)
    return distributed.broadcast_object(meta)  # every rank returns once rank 0 has finished the folder


def _in_order(parts: list[dict[int, Any]], n: int) -> list[Any]:
    merged = {i: value for part in parts for i, value in part.items()}
    return [merged[i] for i in range(n)]


def _finish(out: Path, fp: str, num_batches: int, data_config: dict, meta: dict[str, Any]) -> None:
    """Remove shards beyond the requested size (a smaller rerun), then write the preview and the metadata."""
    for stale in out.glob("shard_*.safetensors"):
        if int(stale.stem.split("_")[1]) >= num_batches:
            stale.unlink()
    write_preview(out, fp, num_batches, data_config)
    write_json(out / META_FILE, meta)


def write_preview(out: Path, fp: str, num_batches: int, data_config: dict, count: int = 64) -> None:
    """A PNG grid of the first images, de-normalised with the model's mean/std."""
    from torchvision.utils import save_image

    images: list[torch.Tensor] = []
    for index in range(num_batches):
        shard = read_shard(shard_path(out, index), fp)
        if shard is None or sum(i.shape[0] for i in images) >= count:
            break
        images.append(shard[0]["images"])
    if not images:
        return
    x = torch.cat(images)[:count]
    mean = torch.tensor(data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, -1, 1, 1)
    with atomic_path(out / PREVIEW_FILE) as tmp:
        save_image((x * std + mean).clamp(0, 1), str(tmp), nrow=8, format="png")
