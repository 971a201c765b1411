"""Fold BatchNorm into the conv/linear layer that feeds it.

For y = γ·(Wx + b - μ)/√(σ² + ε) + β the folded layer is W' = W·γ/√(σ² + ε) (per output channel) and
b' = (b - μ)·γ/√(σ² + ε) + β. A BatchNorm is folded only where a one-example probe shows that its input is exactly the
output of a conv/linear layer that nothing else consumes; a BatchNorm after a nonlinearity or a residual add stays an
FP operation. timm's `BatchNormAct2d` (BN + dropout + activation) is replaced by its dropout and activation.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from ptq.arch import is_batchnorm
from ptq.probe import example_input, hooked

FOLDABLE_LAYERS = (nn.Conv2d, nn.Linear)


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, attr = get_submodule_parent(model, name)
    setattr(parent, attr, new)


def find_foldable(model: nn.Module, example: torch.Tensor | None = None) -> dict[str, str]:
    """Map BatchNorm name → name of the conv/linear whose output is the BatchNorm's input and nothing else's."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FOLDABLE_LAYERS)}
    bns = {n: m for n, m in model.named_modules() if is_batchnorm(m)}
    if not bns:
        return {}
    produced: dict[int, str] = {}
    bn_input: dict[str, int] = {}
    consumers: Counter[int] = Counter()
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children()) or n in bns]

    def pre(name, module, x):
        consumers[id(x)] += 1
        if name in bns:
            bn_input[name] = id(x)

    def post(name, module, x, y):
        if name in layers:
            produced[id(y)] = name

    with torch.no_grad(), hooked(leaves, pre=pre, post=post):
        model(example if example is not None else example_input(model))
    pairs = {}
    for bn_name, tid in bn_input.items():
        layer_name = produced.get(tid)
        if layer_name is None or consumers[tid] != 1:
            continue
        layer, bn = layers[layer_name], bns[bn_name]
        if layer.weight.shape[0] == bn.running_mean.numel():
            pairs[bn_name] = layer_name
    return pairs


@torch.no_grad()
def fold_into(layer: nn.Module, bn: nn.Module) -> None:
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if getattr(bn, "weight", None) is not None else torch.ones_like(std)
    beta = bn.bias.double() if getattr(bn, "bias", None) is not None else torch.zeros_like(std)
    factor = gamma / std
    w = layer.weight.double() * factor.view(-1, *([1] * (layer.weight.ndim - 1)))
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(std)
    b = (b - bn.running_mean.double()) * factor + beta
    layer.weight.copy_(w.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(b.to(layer.weight.dtype))
    else:
        layer.bias.copy_(b.to(layer.bias.dtype))


def bn_remainder(bn: nn.Module) -> nn.Module:
    """What is left of a BatchNorm module once its affine normalisation moved into the layer before it."""
    parts = [getattr(bn, a) for a in ("drop", "act") if isinstance(getattr(bn, a, None), nn.Module)]
    parts = [p for p in parts if not isinstance(p, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def fold_batchnorm(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Fold every legal BatchNorm of `model` in place; return the names of the folded BatchNorm modules."""
    pairs = find_foldable(model, example)
    for bn_name, layer_name in pairs.items():
        bn = model.get_submodule(bn_name)
        fold_into(model.get_submodule(layer_name), bn)
        replace_module(model, bn_name, bn_remainder(bn))
    return sorted(pairs)
