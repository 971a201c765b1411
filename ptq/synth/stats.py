"""BatchNorm-statistic capture on every BatchNorm input of any timm CNN.

For a batch x and BN layer l the statistics are the layer input's per-image, per-channel Σx and Σx²; `moments()` turns
all layers at once into the mean and biased variance over (N, H, W) (per-batch) or over (H, W) for each image
(per-sample, as ZeroQ). Only these reduced statistics are kept — never the activations — and nothing moves between
host and device.

Two ways in, chosen per call. A BatchNorm that normalises with its running statistics through `F.batch_norm` (torch's
BatchNorm*d, timm's BatchNormAct2d, ...) is computed by `FusedBatchNorm`: the normalisation and the statistics in one
op, whose backward is one pass instead of BN's own backward, the statistics' and autograd's sum of the two (on the
CPU; see `BNStatistics`). Any other BatchNorm-like module (frozen variants computing x·a + b themselves, BN in
training mode, a non-float32 input) is read by a forward hook on its input (`ChannelSums`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ptq._fuse import fused
from ptq.arch import is_batchnorm


def _sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel Σx and Σx² of an (N, C, ...) tensor, each of shape (N, C)."""
    flat = x.reshape(*x.shape[:2], -1)
    if x.is_cuda:  # one fused Welford pass; on the CPU two vectorised reductions are faster
        var, mean = torch.var_mean(flat, dim=-1, unbiased=False)
        count = flat.shape[-1]
        return mean * count, (var + mean * mean) * count
    # Σx over the contiguous spatial dimensions and Σx² as a squared 2-norm, each one vectorised read of x: several
    # times faster on the CPU than var_mean over (0, 2, 3) or a batched dot product (lite0's BN inputs: 5-10x)
    return flat.sum(-1), torch.linalg.vector_norm(flat, dim=-1).square()


def _statistics_grad(x: torch.Tensor, g1: torch.Tensor | None, g2: torch.Tensor | None) -> torch.Tensor:
    """∂L/∂x = g₁ + 2·x·g₂ (per image and channel) for L a function of Σx (gradient g₁) and Σx² (gradient g₂)."""
    shape = (*x.shape[:2],) + (1,) * (x.dim() - 2)
    g1 = torch.zeros(shape, device=x.device, dtype=x.dtype) if g1 is None else g1.view(shape)
    if g2 is None:
        return g1.expand_as(x).clone()
    return torch.addcmul(g1, x, 2 * g2.view(shape))


class ChannelSums(torch.autograd.Function):
    """Per-channel Σx and Σx² of an (N, C, ...) tensor over its spatial dimensions: shape (N, C) each."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(x)
        return _sums(x)

    @staticmethod
    def backward(ctx, g1: torch.Tensor | None, g2: torch.Tensor | None):
        (x,) = ctx.saved_tensors
        return _statistics_grad(x, g1, g2)


# Below this many input elements a compiled kernel's fixed cost per call (guards, launch) exceeds what it saves over
# op by op (measured by benchmarks/bn_kernels.py; numbers in docs/synthesis.md).
COMPILED_FROM = 1 << 17


@fused
def _normalize_and_sum(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
    """y = x·a + b (a, b broadcast over x's channels) and Σx, Σx² per image and channel: one pass compiled."""
    return torch.addcmul(shift, x, scale), *_sums(x)


@fused
def _normalize_and_sum_backward(gy, x, scale, g1, g2) -> torch.Tensor:
    """∂L/∂x = g_y·a + g₁ + 2·x·g₂ (g₁, g₂ shaped to broadcast over x's positions): one pass compiled, two op by op."""
    return torch.addcmul(g1, x, 2 * g2).addcmul_(gy, scale)


def _kernel(fn, x: torch.Tensor):
    """`fn` compiled for inputs of at least `COMPILED_FROM` elements, op by op for smaller ones."""
    return fn if x.numel() >= COMPILED_FROM else fn.eager


class FusedBatchNorm(torch.autograd.Function):
    """An eval-mode BatchNorm y = x·a + b (a, b per channel, constants) together with Σx and Σx² of its input.

    Forward and backward are each one compiled kernel (`ptq._fuse`; op by op below `COMPILED_FROM` elements), the
    backward one pass where unfused the same gradient costs BN's own backward (on the CPU 3-4 times a per-channel
    scale), the statistics' pass and autograd's sum of the two; `benchmarks/bn_kernels.py` measures it against
    torch's BN with and without hooked statistics (docs/synthesis.md).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
        channel = (-1,) + (1,) * (x.dim() - 2)
        scale = scale.view(channel)
        ctx.save_for_backward(x, scale)
        return _kernel(_normalize_and_sum, x)(x, scale, shift.view(channel))

    @staticmethod
    def backward(ctx, gy: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor):  # None grads arrive as zeros
        x, scale = ctx.saved_tensors
        per_image = (*x.shape[:2],) + (1,) * (x.dim() - 2)
        grad = _kernel(_normalize_and_sum_backward, x)(gy, x, scale, g1.view(per_image), g2.view(per_image))
        return grad, None, None


def _batch_norm_args(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
) -> tuple:
    """`F.batch_norm`'s arguments, bound by name whichever way they were passed."""
    return input, running_mean, running_var, weight, bias, training, eps


class _BatchNormCalls(TorchFunctionMode):
    """Routes the `F.batch_norm` calls of known layers to `BNStatistics.fused`; every other call runs as it is."""

    def __init__(self, stats: BNStatistics):
        super().__init__()
        self.stats = stats

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            out = self.stats.fused(*_batch_norm_args(*args, **kwargs))
            if out is not None:
                return out
        return func(*args, **kwargs)


class BNStatistics:
    """Records the input statistics of the BatchNorm layers of `model` while enabled (a context manager).

    Only per-channel sums are stored; `moments()` turns all layers into one concatenated mean and variance vector
    (per-batch: (ΣC,), per-sample: (N, ΣC)), so that losses over every layer are a handful of kernels, not a few per
    layer — the difference between 4× and 1.1× the cost of a bare forward+backward on a GPU.

    `fuse` (default: on the CPU) computes the BN layers that normalise with running statistics in float32 by
    `FusedBatchNorm`. Measured on the CPU; on a GPU the unfused path (cuDNN's BN and one statistics kernel each way)
    is the measured one. Layers it cannot fuse are read by the forward hook either way.
    """

    def __init__(self, model: nn.Module, per_sample: bool = False, fuse: bool | None = None):
        self.layers = [(name, m) for name, m in model.named_modules() if is_batchnorm(m) and m.running_var is not None]
        self.per_sample = per_sample
        self.fuse = fuse
        self.sums: list[torch.Tensor | None] = [None] * len(self.layers)
        self.squares: list[torch.Tensor | None] = [None] * len(self.layers)
        self.counts: list[int] = [1] * len(self.layers)
        self.channels = [int(m.running_mean.numel()) for _, m in self.layers]
        self.offsets = [sum(self.channels[:i]) for i in range(len(self.layers) + 1)]
        self._handles: list = []
        self._mode: _BatchNormCalls | None = None
        self._index: dict[int, int] = {}  # id(running_mean) -> layer
        self._fused = [False] * len(self.layers)  # whether the layer's current call was fused
        self._affine: dict[int, tuple] = {}  # layer -> (versions of its BN tensors, scale, shift)
        self._count_cache: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.layers)

    def _hook(self, index: int):
        def hook(module, args, output):
            if self._fused[index]:
                self._fused[index] = False
                return
            x = args[0]
            self.sums[index], self.squares[index] = ChannelSums.apply(x.float())
            self.counts[index] = math.prod(x.shape[2:])

        return hook

    def fused(self, x, running_mean, running_var, weight, bias, training, eps) -> torch.Tensor | None:
        """BN output of a known layer's `F.batch_norm` call with its statistics recorded, or None to run it as is."""
        index = self._index.get(id(running_mean))
        grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, bias))
        if index is None or training or grads or x.dtype != torch.float32 or x.dim() < 2 or running_var is None:
            return None
        key = tuple(t._version if t is not None else -1 for t in (running_mean, running_var, weight, bias))
        cached = self._affine.get(index)
        if cached is None or cached[0] != key or cached[1].device != x.device:  # constants while the layer's are
            scale = torch.rsqrt(running_var.float() + eps)
            scale = scale * weight if weight is not None else scale
            shift = -running_mean.float() * scale
            shift = shift + bias if bias is not None else shift
            cached = self._affine[index] = (key, scale, shift)
        y, self.sums[index], self.squares[index] = FusedBatchNorm.apply(x, cached[1], cached[2])
        self.counts[index] = math.prod(x.shape[2:])
        self._fused[index] = True
        return y

    def __enter__(self) -> BNStatistics:
        self._handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]
        self._fused = [False] * len(self.layers)
        device = self.layers[0][1].running_mean.device if self.layers else torch.device("cpu")
        if self.fuse if self.fuse is not None else device.type == "cpu":
            self._index = {id(m.running_mean): i for i, (_, m) in enumerate(self.layers)}
            self._mode = _BatchNormCalls(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        for h in self._handles:
            h.remove()
        self._handles = []

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and biased variance of every BN input, layers concatenated along the last dimension."""
        s1, s2 = torch.cat(self.sums, dim=1), torch.cat(self.squares, dim=1)  # (N, ΣC)
        key = (tuple(self.counts), s1.device)
        if key not in self._count_cache:  # built once per input size: no host-to-device copy per iteration
            counts = torch.repeat_interleave(torch.tensor(self.counts, dtype=s1.dtype), torch.tensor(self.channels))
            self._count_cache[key] = counts.to(s1.device)
        count = self._count_cache[key]
        if not self.per_sample:
            s1, s2, count = s1.sum(0), s2.sum(0), count * s1.shape[0]
        mean = s1 / count
        return mean, (s2 / count - mean * mean).clamp_min(0)

    def running(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The BN layers' running mean and variance, concatenated (the targets of BNS matching)."""
        means = torch.cat([m.running_mean.float() for _, m in self.layers])
        return means, torch.cat([m.running_var.float() for _, m in self.layers])

    def layer_weights(self, first: int = 0) -> torch.Tensor:
        """Per-element weights 1/(C_l · L') over layers first..L-1, so that a weighted sum is the mean per-layer MSE."""
        chosen = self.channels[first:]
        return torch.repeat_interleave(torch.tensor([1.0 / (c * len(chosen)) for c in chosen]), torch.tensor(chosen))

    def deep_start(self) -> int:
        """The first of the deeper half of BN layers used by FDDA (arXiv 2109.04186): l ≥ floor((N_BN + 1) / 2) − 2."""
        return max(0, (len(self.layers) + 1) // 2 - 2)


class FeatureTap:
    """Captures the penultimate feature (the classifier's input) of a timm model during its forward."""

    def __init__(self, model: nn.Module):
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
            raise ValueError("the model has no classifier module whose input could serve as the feature")
        self.classifier = classifier
        self.features: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> FeatureTap:
        def hook(module, args):
            self.features = args[0].flatten(1)

        self._handle = self.classifier.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
