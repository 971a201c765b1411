"""Cross-layer equalization (DFQ arXiv 1906.04721): rescale channels between two layers so that both have the same
weight range per channel, leaving the FP function unchanged.

For conv₁ → f → conv₂, where conv₂ reads only f(conv₁'s output) and f is positively homogeneous per channel
(f(x/s) = f(x)/s for s > 0: ReLU, leaky ReLU, identity, dropout, average pooling), output channel i of conv₁ (and
its bias) is divided by s_i and input channel i of conv₂ multiplied by it, with

    s_i = √(r₁ᵢ / r₂ᵢ),   r₁ᵢ = max|W₁[i, ...]|,   r₂ᵢ = max|W₂[:, i, ...]|

so that both ranges become √(r₁ᵢ·r₂ᵢ). A clipping activation — ReLU6, Hardtanh(0, t) — is homogeneous only if its
clip moves with the channel: it becomes `ChannelClamp` with upper bound t/s_i, which is exact. A layer in two pairs
(a depthwise convolution between two pointwise ones) is balanced by a few sweeps over all pairs.

Which pairs exist is found by a one-example probe following tensor identities, as BatchNorm folding does, so the
placement (which activations become `ChannelClamp`) depends on the architecture only, not on the weights; the
bounds are buffers, saved and loaded with the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ptq._fuse import eager
from ptq.probe import example_input, hooked
from ptq.quant.fold import replace_module

SWEEPS = 8


class ChannelClamp(nn.Module):
    """clamp(x, lo_c, hi_c) with one range per channel (dimension 1): a ReLU6 after equalization."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor):
        super().__init__()
        self.register_buffer("lo", lo.detach().clone().float())
        self.register_buffer("hi", hi.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.maximum(torch.minimum(x, self.hi.view(shape)), self.lo.view(shape))


HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.AdaptiveAvgPool2d, nn.AvgPool2d, ChannelClamp)


def _clamp_bounds(module: nn.Module) -> tuple[float, float] | None:
    """(0, t) for a ReLU6 or a Hardtanh clipping at 0 and t > 0: homogeneous once its clip is per channel."""
    if type(module) is nn.ReLU6:
        return 0.0, 6.0
    if type(module) is nn.Hardtanh and module.min_val == 0 and module.max_val > 0:
        return 0.0, float(module.max_val)
    return None


@dataclass
class Pair:
    first: str  # conv whose output channels are divided by s
    second: str  # conv/linear whose input channels are multiplied by s
    clamps: list[str]  # clipping activations in between, made per-channel


class _Uses(TorchFunctionMode):
    """Which module (None: none, e.g. a residual `+` in a block's forward) made each torch call that read a tensor:
    module hooks alone do not see a tensor read outside any module."""

    def __init__(self):
        super().__init__()
        self.inside: str | None = None
        self.by: dict[int, set[str | None]] = {}
        self.alive: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for a in (*args, *(kwargs or {}).values()):
            if isinstance(a, torch.Tensor):
                self.by.setdefault(id(a), set()).add(self.inside)
                self.alive.append(a)  # no id is reused by another tensor during the probe
        out = func(*args, **(kwargs or {}))
        self.alive.append(out)
        return out


def find_pairs(model: nn.Module, example: torch.Tensor | None = None) -> list[Pair]:
    """conv → (homogeneous modules) → conv/linear chains in which nothing but the chain reads a tensor on the way."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    # tensor id → (first conv, clamps on the way, (tensor id, module) steps on the way)
    made_by: dict[int, tuple[str, list[str], list[tuple[int, str]]]] = {}
    found: list[tuple[Pair, list[tuple[int, str]]]] = []
    uses = _Uses()

    def pre(name, module, x):
        uses.inside = name
        if name in layers and id(x) in made_by:
            first, clamps, chain = made_by[id(x)]
            found.append((Pair(first, name, clamps), [*chain, (id(x), name)]))

    def post(name, module, x, y):
        uses.inside = None
        if name in layers:
            made_by[id(y)] = (name, [], [])
        elif id(x) in made_by and (isinstance(module, HOMOGENEOUS) or _clamp_bounds(module) is not None):
            first, clamps, chain = made_by[id(x)]
            clamp = [name] if _clamp_bounds(module) is not None or isinstance(module, ChannelClamp) else []
            made_by[id(y)] = (first, clamps + clamp, [*chain, (id(x), name)])

    with torch.no_grad(), hooked(leaves, pre=pre, post=post), uses, eager():
        model(example if example is not None else example_input(model))
    pairs = []
    for pair, chain in found:
        on_chain = {name for _, name in chain}
        if all(uses.by.get(i, set()) <= on_chain for i, _ in chain) and _compatible(
            layers[pair.first], layers[pair.second]
        ):
            pairs.append(pair)
    return pairs


def _compatible(first: nn.Module, second: nn.Module) -> bool:
    if not isinstance(first, nn.Conv2d) or first.groups not in (1, first.out_channels):
        return False
    channels = first.out_channels
    if isinstance(second, nn.Linear):
        return second.in_features == channels
    return second.in_channels == channels and second.groups in (1, channels)


def _out_range(layer: nn.Conv2d) -> torch.Tensor:
    return layer.weight.detach().abs().reshape(layer.weight.shape[0], -1).amax(1)


def _in_range(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach().abs()
    if isinstance(layer, nn.Conv2d) and layer.groups > 1:  # depthwise: input channel i is output channel i
        return w.reshape(w.shape[0], -1).amax(1)
    return w.transpose(0, 1).reshape(w.shape[1], -1).amax(1)


@torch.no_grad()
def _scale_pair(model: nn.Module, pair: Pair) -> torch.Tensor:
    first, second = model.get_submodule(pair.first), model.get_submodule(pair.second)
    r1, r2 = _out_range(first), _in_range(second)
    s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp(min=1e-30)), torch.ones_like(r1))
    first.weight.div_(s.view(-1, *([1] * (first.weight.dim() - 1))))
    if first.bias is not None:
        first.bias.div_(s)
    if isinstance(second, nn.Conv2d) and second.groups > 1:
        second.weight.mul_(s.view(-1, *([1] * (second.weight.dim() - 1))))
    else:
        second.weight.mul_(s.view(1, -1, *([1] * (second.weight.dim() - 2))))
    for name in pair.clamps:
        clamp = model.get_submodule(name)
        clamp.lo.div_(s)
        clamp.hi.div_(s)
    return s


def equalize(model: nn.Module, example: torch.Tensor | None = None, sweeps: int = SWEEPS) -> list[Pair]:
    """Equalize every pair of `model` in place (after BatchNorm folding); returns the pairs."""
    pairs = find_pairs(model, example)
    for pair in pairs:
        for name in pair.clamps:
            module = model.get_submodule(name)
            if not isinstance(module, ChannelClamp):
                lo, hi = _clamp_bounds(module)
                channels = model.get_submodule(pair.first).weight.shape[0]
                device = model.get_submodule(pair.first).weight.device
                clamp = ChannelClamp(torch.full((channels,), lo), torch.full((channels,), hi)).to(device)
                replace_module(model, name, clamp)
    for _ in range(sweeps):
        for pair in pairs:
            _scale_pair(model, pair)
    return pairs
