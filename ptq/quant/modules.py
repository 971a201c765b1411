"""Quantized modules: they hold quantizer state; the math lives in `ptq.quant.functional`.

- `WeightQuantizer`: per-channel or per-tensor fake quantization of a weight tensor.
- `ActQuantizer`: per-tensor fake quantization of an activation; during calibration an observer records its input.
- `QuantLayer`: a conv or linear layer (any subclass, e.g. timm's `Conv2dSame`) whose weight, and optionally input,
  are quantized. The wrapped layer's own forward is reused through `torch.func.functional_call`.
- `OutputQuant`: quantizes the output of the module it wraps (a nonlinearity, a residual block, a squeeze-excite).

Each quantizer has an `enabled` switch; `set_quant_state` flips them for a whole model.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from ptq.config import WeightGranularity
from ptq.quant.functional import act_fake_quantize, channel_view, fake_quantize, qrange
from ptq.quant.observers import Observer


class Quantizer(nn.Module):
    """Base contract: `bits`, `scale`, `zero_point` (shape (C,) or (1,)), an `enabled` switch, `calibrated` flag."""

    def __init__(self, bits: int, channels: int = 1, axis: int = 0):
        super().__init__()
        self.bits = bits
        self.axis = axis
        self.enabled = False
        self.calibrated = False
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("zero_point", torch.zeros(channels))

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale = scale.detach().to(self.scale).reshape(self.scale.shape).clone()
        self.zero_point = zero_point.detach().to(self.zero_point).reshape(self.zero_point.shape).clone()
        self.calibrated = True

    def learn_scale(self, learn: bool = True) -> nn.Parameter | None:
        """Make `scale` a trainable parameter (returned), or, with `learn=False`, a buffer again keeping its value."""
        value = self.scale.detach().clone()
        del self.scale  # a buffer or a parameter: either way it is re-registered below
        if learn:
            self.scale = nn.Parameter(value)
            return self.scale
        self.register_buffer("scale", value)
        return None

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale.numel() == 1:
            return fake_quantize(x, self.scale, self.zero_point, self.bits)
        s = channel_view(self.scale, x.ndim, self.axis)
        z = channel_view(self.zero_point, x.ndim, self.axis)
        return fake_quantize(x, s, z, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.scale.numel()}, enabled={self.enabled}"


class WeightQuantizer(Quantizer):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.quantize(w) if self.enabled else w


class ActQuantizer(Quantizer):
    """Per-tensor activation quantizer. `keep_prob` p (QDrop, arXiv 2203.05740, reconstruction only): each element
    keeps its quantized value with probability p and passes its FP value otherwise; None (always quantized) at
    inference, where p = 1 is the same. During reconstruction `scale` may be made a parameter (`learn_scale`): its
    gradient then follows LSQ (arXiv 1902.08153), scaled by 1/√(N·Qp)."""

    def __init__(self, bits: int):
        super().__init__(bits, channels=1)
        self.observer: Observer | None = None
        self.keep_prob: float | None = None

    def forward(self, x: torch.Tensor, clip: tuple[float, float] | None = None) -> torch.Tensor:
        """Fake-quantize x, or with `clip` (lo, hi) x clamped to that range first (a ReLU/ReLU6 folded in)."""
        if clip is not None and (self.observer is not None or not self.enabled):
            x, clip = x.clamp(*clip), None
        if self.observer is not None:
            self.observer.observe(x)
        if not self.enabled:
            return x
        grad_factor = 1.0
        if self.scale.requires_grad:  # LSQ: the step's gradient scaled by 1/√(N·Qp), N = elements per example
            grad_factor = 1.0 / math.sqrt(x[0].numel() * qrange(self.bits)[1])
        return act_fake_quantize(x, self.scale, self.zero_point, self.bits, self.keep_prob, grad_factor, clip)


class QuantLayer(nn.Module):
    """A conv/linear layer with a quantized weight (per output channel) and an optional input quantizer."""

    def __init__(self, layer: nn.Module, w_bits: int, granularity: WeightGranularity = WeightGranularity.CHANNEL):
        super().__init__()
        self.layer = layer
        channels = layer.weight.shape[0] if WeightGranularity(granularity) is WeightGranularity.CHANNEL else 1
        self.weight_quantizer = WeightQuantizer(w_bits, channels)
        self.input_quantizer: ActQuantizer | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if not self.weight_quantizer.enabled:
            return self.layer(x)
        layer, weight = self.layer, self.weight_quantizer(self.layer.weight)
        kind = type(layer)
        if kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d):  # the layer's own forward with another weight, minus the
            return layer._conv_forward(x, weight, layer.bias)  # swapping the weight in and out costs per call
        if kind is nn.Linear:
            return F.linear(x, weight, layer.bias)
        return functional_call(layer, {"weight": weight}, (x,))


def clamp_range(module: nn.Module) -> tuple[float, float] | None:
    """(lo, hi) if `module` is exactly a clamp — ReLU, ReLU6, Hardtanh — else None."""
    if type(module) is nn.ReLU:
        return 0.0, math.inf
    if type(module) in (nn.ReLU6, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    return None


class OutputQuant(nn.Module):
    """Applies `quantizer` to the output of `module`. A wrapped ReLU/ReLU6 is done by the quantizer itself, in the
    same pass over the tensor (same values; one pass instead of three during reconstruction)."""

    def __init__(self, module: nn.Module, quantizer: ActQuantizer):
        super().__init__()
        self.module = module
        self.quantizer = quantizer

    def forward(self, *args, **kwargs):
        clip = clamp_range(self.module) if self.quantizer.enabled and len(args) == 1 and not kwargs else None
        if clip is not None:
            return self.quantizer(args[0], clip=clip)
        return self.quantizer(self.module(*args, **kwargs))


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}


def act_quantizers(model: nn.Module) -> dict[str, ActQuantizer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ActQuantizer)}


def set_quant_state(model: nn.Module, weights: bool = True, activations: bool = True) -> nn.Module:
    """Switch weight and activation fake quantization on or off for every quantizer in `model`."""
    for m in model.modules():
        if isinstance(m, WeightQuantizer):
            m.enabled = weights
        elif isinstance(m, ActQuantizer):
            m.enabled = activations
    return model
