"""Running across processes, GPUs and nodes under `torchrun`: rank and world size from the environment torchrun
sets, one process group (gloo on CPU, NCCL on CUDA), and the few collectives the jobs use, all with a timeout.

Without torchrun (no `WORLD_SIZE`, or 1) every helper here is the identity for one process, so the jobs read the
same either way. Rank 0 writes every shared output (checkpoints, reports, metadata); outputs must be on a
filesystem all ranks see. A collective that waits longer than `PTQ_DIST_TIMEOUT` seconds (default 1800) for a
rank raises instead of hanging; torchrun itself ends the whole job when any rank exits with an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# where this process stands needs no torch: it lives in ptq._world, and is this module's too
from ptq._world import DistributedError, World, _env_int, joined, shard, world  # noqa: F401 (re-exported)

TIMEOUT_ENV = "PTQ_DIST_TIMEOUT"


def timeout() -> timedelta:
    seconds = _env_int(TIMEOUT_ENV, 1800)
    if seconds <= 0:
        raise DistributedError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {seconds}")
    return timedelta(seconds=seconds)


def setup(device: str | torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes and return this rank's device: `cuda` becomes `cuda:LOCAL_RANK`.

    One process (no torchrun): nothing to join, the device is returned as given."""
    w, device = world(), torch.device(device)
    if not w.distributed:
        return w, device
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed; run without torchrun")
    if device.type == "cuda" and device.index is not None:
        raise DistributedError(
            f"--device {device} under torchrun would put every rank on one GPU; pass --device cuda (each rank "
            "takes cuda:LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    if device.type == "cuda" and device.index is None:
        if w.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {w.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                "use --nproc-per-node at most the number of GPUs per node"
            )
        device = torch.device("cuda", w.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timeout(), **kwargs)
    return world(), device


def teardown() -> None:
    if joined():
        dist.destroy_process_group()


@contextmanager
def _waiting(op: str):
    """A collective that times out or loses a peer becomes one clear error (torchrun stops the other ranks)."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # the backend's source location
        if "time" in first.lower():
            raise DistributedError(
                f"waited longer than {TIMEOUT_ENV}={int(timeout().total_seconds())} s for the other ranks in {op} "
                f"({first}); if a rank only needed longer (one synthesis batch, one model), raise {TIMEOUT_ENV}"
            ) from None
        raise DistributedError(f"lost contact with the other ranks in {op} ({first})") from None


def _active() -> bool:
    return joined() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if _active():
        with _waiting("a barrier"):
            dist.barrier()


def _pack(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """`tensors` as one flat buffer on `device`, in the first one's dtype (one collective, whatever their number)."""
    return torch.cat([t.detach().reshape(-1).to(device, tensors[0].dtype) for t in tensors])


def _unpack(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.detach().copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum `tensors` (of one dtype) over ranks in place."""
    if not _active() or not tensors:
        return
    flat = _pack(tensors, _collective_device())
    with _waiting("an all-reduce"):
        dist.all_reduce(flat)
    _unpack(flat, tensors)


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Give every rank rank `src`'s values of `tensors` (of one dtype, same shapes on every rank), in place."""
    tensors = list(tensors)
    if not _active() or not tensors:
        return
    flat = _pack(tensors, _collective_device())
    with _waiting("a broadcast"):
        dist.broadcast(flat, src)
    _unpack(flat, tensors)


def owns(index: int) -> bool:
    """Whether item `index` of a list shared out round-robin is this rank's to compute."""
    w = world()
    return index % w.size == w.rank


def share_owned(items: Sequence[Sequence[torch.Tensor]]) -> None:
    """Give every rank the (float) tensors of item i as computed by its owner (rank i mod world size), in place."""
    if not _active():
        return
    size = dist.get_world_size()
    for src in range(size):  # one buffer per owner
        broadcast_([t for i in range(src, len(items), size) for t in items[i]], src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` (anything picklable), on every rank."""
    if not _active():
        return obj
    box = [obj]
    with _waiting("a broadcast"):
        dist.broadcast_object_list(box, src, device=_collective_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    with _waiting("a gather"):
        dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `fn` on rank 0 only (checks that may also clear a folder); every rank returns its result or raises its
    exception, marked `shared` so that only rank 0 reports it."""
    result = error = None
    if world().main:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - handed to every rank below
            error = e
    if not _active():
        if error is not None:
            raise error
        return result
    result, error = broadcast_object((result, error))
    if error is not None:
        error.shared = True
        raise error
    return result


def together(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `fn` on every rank (work each rank needs, such as loading the model or listing the images) and stop every
    rank when it failed on any. Where every rank failed alike, the error is marked `shared` (rank 0 reports it once);
    else each failed rank raises its own and the others a `DistributedError` naming the first that failed, marked
    `shared`. `fn` must not itself wait for the other ranks."""
    result = error = None
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - every rank learns of it below
        error = e
    if not _active():
        if error is not None:
            raise error
        return result
    outcomes = gather_objects(None if error is None else f"{type(error).__qualname__}: {error}")
    failed = [rank for rank, outcome in enumerate(outcomes) if outcome is not None]
    if not failed:
        return result
    if error is None:
        stop = DistributedError(f"stopped: rank {failed[0]} failed ({outcomes[failed[0]]})")
        stop.shared = True
        raise stop
    if len(failed) == len(outcomes) and len(set(outcomes)) == 1:
        error.shared = True
    raise error
