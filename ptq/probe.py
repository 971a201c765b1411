"""Learn a model's dataflow without graph tracing: run one example forward with hooks that see tensor identities.

Hooks only record which module produced or consumed which tensor object (by `id`); the tensors are kept alive for the
duration of the probe so that identities are never reused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn

PreHook = Callable[[str, nn.Module, torch.Tensor], None]
PostHook = Callable[[str, nn.Module, torch.Tensor, torch.Tensor], None]


def first_tensor(args) -> torch.Tensor | None:
    for a in args if isinstance(args, tuple) else (args,):
        if isinstance(a, torch.Tensor):
            return a
    return None


@contextmanager
def hooked(modules: Iterable[tuple[str, nn.Module]], pre: PreHook | None = None, post: PostHook | None = None):
    """Attach `pre(name, module, input)` / `post(name, module, input, output)` hooks to `modules` for the block."""
    handles = []
    keep: list[torch.Tensor] = []  # keep every seen tensor alive so ids stay unique during the probe

    def make_pre(name):
        def hook(module, args):
            x = first_tensor(args)
            if x is not None:
                keep.append(x)
                pre(name, module, x)

        return hook

    def make_post(name):
        def hook(module, args, output):
            x, y = first_tensor(args), first_tensor(output)
            if x is not None and y is not None:
                keep.extend((x, y))
                post(name, module, x, y)

        return hook

    try:
        for name, module in modules:
            if pre is not None:
                handles.append(module.register_forward_pre_hook(make_pre(name)))
            if post is not None:
                handles.append(module.register_forward_hook(make_post(name)))
        yield keep
    finally:
        for h in handles:
            h.remove()
        keep.clear()


def example_input(model: nn.Module, batch: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """A zero image of the model's pretrained input size (3×224×224 when the model does not say)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    return torch.zeros((batch, *size), device=device)
