"""Chains of element-wise operations compiled into single kernels (`torch.compile`), with an eager fallback.

Reconstruction spends most of an iteration in element-wise work over every weight (AdaRound's soft rounding and
its regulariser) and every activation (fake quantization with QDrop mixing): a dozen passes over the same memory
each, which one compiled kernel does in one; synthesis computes each BatchNorm with its input statistics so. A
function wrapped with `fused` is compiled on its first call with dynamic shapes (callers flatten tensors so that one
graph serves every layer); where compilation is unavailable (no C++ compiler, no Triton) or fails, a warning says so
once and the function runs op by op from then on, with the same results up to floating-point rounding.
`PTQ_COMPILE=0` turns compilation off.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable)
RECOMPILE_LIMIT = 64
# With dynamic shapes inductor may judge a CPU kernel too small to share out and run it on one thread: the
# activation kernel with a ReLU6 taken in ran serially, at half the speed of the shared-out kernel on 2 threads.
# This option makes every kernel a parallel region and leaves the thread count to OpenMP.
OPTIONS = {"cpp.dynamic_threads": True}


_eager = threading.local()


def compiling_allowed() -> bool:
    return os.environ.get("PTQ_COMPILE", "1") != "0" and not getattr(_eager, "depth", 0)


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Fused functions run op by op inside this block: for probes that watch every torch call of a forward pass (a
    compiled graph would hide them), without turning compilation off for anyone else."""
    _eager.depth = getattr(_eager, "depth", 0) + 1
    try:
        yield
    finally:
        _eager.depth -= 1


def fused(fn: F) -> F:
    """`fn` compiled on first use (see the module docstring); `fn.eager` is the uncompiled function."""
    state: dict[str, Callable | None] = {"compiled": None}

    @functools.wraps(fn)
    def call(*args):
        if state["compiled"] is False or not compiling_allowed() or torch.compiler.is_compiling():
            return fn(*args)
        if state["compiled"] is None:
            # inductor's C++ toolchain set-up warns that no CUDA runtime exists on CPU-only machines: not our concern
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            # one graph per combination of None/bool arguments and dtypes: more than dynamo's default limit of 8
            # per function, past which a full-graph compile fails (and the function would run op by op)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            state["compiled"] = torch.compile(fn, dynamic=True, fullgraph=True, options=OPTIONS)
        if not torch.is_grad_enabled():  # e.g. inside an autograd.Function: an input that requires grad would
            # still be traced as one, and its kernel ran at half speed (measured on AdaRound's soft weight)
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        try:
            return state["compiled"](*args)
        except Exception as exc:  # noqa: BLE001 - any failure to compile means: run it eagerly
            state["compiled"] = False
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("could not compile %s (%s); running it op by op, which is slower", fn.__name__, reason[:200])
            return fn(*args)

    call.eager = fn
    return call  # type: ignore[return-value]
