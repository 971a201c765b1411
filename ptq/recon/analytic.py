"""Input means without data, for analytic bias correction (DFQ arXiv 1906.04721).

A BatchNorm's output has, per channel c, the mean β_c and the standard deviation |γ_c| it was trained to give. A
layer whose input is that output, passed through element-wise modules (ReLU, ReLU6, SiLU, hard-swish, dropout,
an activation quantizer — taken as the identity) and mean-preserving ones (average pooling, flattening), therefore
sees per channel E[f(z)] with z ~ N(β_c, γ_c²), integrated numerically for any element-wise f.

A one-example probe follows tensor identities from each layer whose BatchNorm was folded into it, through such
modules, to the layers reading the result. Inputs made otherwise (a residual add, the image, concatenation) have no
analytic mean: those layers are left out, and their biases are not corrected.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ptq._fuse import eager
from ptq.arch import IDENTITIES, MEAN_PRESERVING, is_batchnorm
from ptq.probe import hooked
from ptq.quant.fold import find_foldable
from ptq.quant.modules import ActQuantizer, OutputQuant, quant_layers
from ptq.quant.prepare import NONLINEARITIES
from ptq.recon.gptq import groups_of, supported, unfold

GRID_POINTS = 4001


def gaussian_mean(f, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """E[f(z)] per channel for z ~ N(mean, std²) (vectors of C), f applied to a (1, C, K, 1) tensor: the Gaussian
    density on a fine grid of ±8 standard deviations (accurate to ~1e-6 also where f has kinks, as ReLU6 does)."""
    t = torch.linspace(-8, 8, GRID_POINTS, dtype=torch.float64, device=mean.device)
    w = torch.exp(-0.5 * t * t)
    w /= w.sum()
    z = mean.double().view(-1, 1) + std.double().abs().view(-1, 1) * t.view(1, -1)
    with torch.no_grad():
        fz = f(z.float().view(1, z.shape[0], z.shape[1], 1)).double().view(z.shape)
    return (fz * w).sum(1)


def _elementwise(module: nn.Module):
    """The function a module applies element-wise, or None if it is not one this analysis follows."""
    if isinstance(module, OutputQuant):
        return _elementwise(module.module)
    if isinstance(module, (ActQuantizer, *IDENTITIES)):
        return lambda x: x
    return module if isinstance(module, NONLINEARITIES) else None


class _WritesOutside(TorchFunctionMode):
    """Stops following a tensor that is changed in place outside the followed modules (a residual `x += shortcut`
    keeps the tensor's identity but not its distribution)."""

    def __init__(self, tracked: dict):
        super().__init__()
        self.tracked = tracked
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        in_place = (name.endswith("_") and not name.endswith("__")) or kwargs.get("inplace") is True
        if in_place and self.depth == 0 and args and isinstance(args[0], torch.Tensor):
            self.tracked.pop(id(args[0]), None)
        return func(*args, **kwargs)


def _unwrapped_name(qmodel: nn.Module, name: str) -> str:
    """The name a module of a prepared model had before `prepare` wrapped blocks in `OutputQuant` (".module")."""
    parts, kept = name.split("."), []
    for i, part in enumerate(parts):
        if part == "module" and isinstance(qmodel.get_submodule(".".join(parts[:i])), OutputQuant):
            continue
        kept.append(part)
    return ".".join(kept)


def analytic_input_means(qmodel: nn.Module, fp_model: nn.Module, example: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per quantized layer of `qmodel` (made by `prepare` from `fp_model`), the mean of its unfolded input columns,
    (groups, d), where the BatchNorm statistics of `fp_model` determine it; see the module docstring."""
    bns = {name: m for name, m in fp_model.named_modules() if is_batchnorm(m)}
    folded = {layer: bn for bn, layer in find_foldable(fp_model, example).items()}
    layers = quant_layers(qmodel)
    moments = {}  # layer → (β, |γ|) of the BatchNorm folded into it
    for name in layers:
        bn_name = folded.get(_unwrapped_name(qmodel, name))
        if bn_name is not None:
            bn = bns[bn_name]
            weight = bn.weight if getattr(bn, "weight", None) is not None else torch.ones_like(bn.running_mean)
            bias = bn.bias if getattr(bn, "bias", None) is not None else torch.zeros_like(bn.running_mean)
            moments[name] = (bias.detach(), weight.detach().abs())
    # tensor id → (layer that made it, element-wise functions applied since)
    tracked: dict[int, tuple[str, list]] = {}
    inputs: dict[str, tuple[str, list] | None] = {}
    shapes: dict[str, torch.Tensor] = {}
    # an output-quantized nonlinearity is followed as one function (its quantizer may do the clamp itself)
    inside_wrapper = {
        id(c)
        for m in qmodel.modules()
        if isinstance(m, OutputQuant) and _elementwise(m.module) is not None
        for c in m.modules()
        if c is not m
    }
    watched = [(n, m) for n, m in qmodel.named_modules() if n and id(m) not in inside_wrapper
               and (n in layers or _elementwise(m) is not None or isinstance(m, MEAN_PRESERVING))]  # fmt: skip
    writes = _WritesOutside(tracked)

    def pre(name, module, x):
        writes.depth += 1
        if name in layers:
            inputs.setdefault(name, tracked.get(id(x)))
            shapes.setdefault(name, x)

    def post(name, module, x, y):
        writes.depth -= 1
        if name in layers:
            if name in moments:
                tracked[id(y)] = (name, [])
            return
        source = tracked.get(id(x))
        if source is None:
            return
        f = _elementwise(module)
        if f is not None:
            tracked[id(y)] = (source[0], [*source[1], f])
        elif isinstance(module, MEAN_PRESERVING):
            tracked[id(y)] = source

    with torch.no_grad(), hooked(watched, pre=pre, post=post), writes, eager():
        qmodel(example)
    means = {}
    for name, source in inputs.items():
        layer = layers[name].layer
        if source is None or not supported(layer):
            continue
        beta, gamma = moments[source[0]]
        chain = source[1]

        def f(x, chain=chain):
            for g in chain:
                x = g(x)
            return x

        channel_mean = gaussian_mean(f, beta, gamma).to(layer.weight.device)
        x = shapes[name]
        if x.dim() == 4:
            mean_image = channel_mean.view(1, -1, 1, 1).float().expand(1, -1, *x.shape[2:])
        else:
            mean_image = channel_mean.view(1, -1).float().expand(*x.shape[:-1], -1)
        # the mean of every unfolded entry: the channel's mean where the window lies inside the input, 0 in padding
        means[name] = unfold(layer, mean_image.contiguous()).double().mean(-1)
        assert means[name].shape[0] == groups_of(layer)
    return means
