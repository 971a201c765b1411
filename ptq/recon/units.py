"""Reconstruction units of a prepared model, found without tracing (BRECQ arXiv 2102.05426: one block at a time).

A unit is either a residual block — ResNet BasicBlock/Bottleneck, RegNet Bottleneck, and timm's efficientnet-family
blocks (InvertedResidual, DepthwiseSeparableConv, EdgeResidual, ... : they carry `has_skip`), MobileNetV2/V3 and
MNASNet included — taken together with the output quantizer `prepare` put around it, or a single quantized layer
(stem, head, classifier, anything not inside a known block). Units do not nest, cover every quantized layer exactly
once, and are listed in the order the network runs them (found with a one-example probe).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from ptq.arch import BLOCK_CLASSES
from ptq.probe import example_input, hooked
from ptq.quant.modules import OutputQuant, QuantLayer


class UnitKind(str, Enum):
    BLOCK = "block"
    LAYER = "layer"


@dataclass
class Unit:
    name: str  # module path in the prepared model
    kind: UnitKind
    layers: list[str]  # paths of the quantized layers it contains
    in_numel: int = 0  # elements of one example's input and output (from the probe; sizes the cache)
    out_numel: int = 0

    def module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.name)


def is_block(module: nn.Module) -> bool:
    inner = module.module if isinstance(module, OutputQuant) else module
    return isinstance(inner, BLOCK_CLASSES) or getattr(inner, "has_skip", None) is not None


def find_units(model: nn.Module, example: torch.Tensor | None = None, layerwise: bool = False) -> list[Unit]:
    """The reconstruction units of a model made by `prepare`, in execution order (every layer alone if `layerwise`)."""
    units: list[Unit] = []
    claimed: set[str] = set()
    for name, module in model.named_modules():
        if not name or any(name == c or name.startswith(c + ".") for c in claimed):
            continue
        if (
            is_block(module) and not layerwise
        ):  # an OutputQuant-wrapped block comes before its inner module, which is then claimed
            layers = [f"{name}.{n}" for n, m in module.named_modules() if isinstance(m, QuantLayer)]
            if layers:
                units.append(Unit(name, UnitKind.BLOCK, layers))
                claimed.add(name)
        elif isinstance(module, QuantLayer):
            units.append(Unit(name, UnitKind.LAYER, [name]))
            claimed.add(name)
    order: dict[str, int] = {}
    sizes: dict[str, tuple[int, int]] = {}
    by_name = {u.name: model.get_submodule(u.name) for u in units}

    def pre(name, module, x):
        order.setdefault(name, len(order))

    def post(name, module, x, y):
        sizes.setdefault(name, (x[0].numel(), y[0].numel()))

    with torch.no_grad(), hooked(by_name.items(), pre=pre, post=post):
        model(example if example is not None else example_input(model))
    for u in units:
        u.in_numel, u.out_numel = sizes.get(u.name, (0, 0))
    return sorted(units, key=lambda u: order.get(u.name, len(order)))
