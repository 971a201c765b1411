"""BatchNorm-statistic capture: forward pre-hooks on every BatchNorm input of any timm CNN.

For a batch x and BN layer l the hook computes, in one fused pass, the per-channel mean and biased variance of the
layer's input over (N, H, W) (per-batch) or over (H, W) for each image (per-sample, as ZeroQ). Only these reduced
statistics are kept — never the activations — and nothing moves between host and device.
"""

from __future__ import annotations

import torch
from torch import nn

from ptq.quant.fold import is_batchnorm


class ChannelMoments(torch.autograd.Function):
    """Per-channel mean and biased variance of an NCHW tensor over (H, W) and, unless per-sample, N.

    Forward: Σx over the contiguous (H, W) and Σx² as a batched dot product — about 4× faster on the CPU than
    `torch.var_mean` over (0, 2, 3). Backward in one fused pass: ∂L/∂x = x·c + b with per-channel
    c = 2·g_var/M and b = g_mean/M − c·mean (M = elements reduced per channel).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        s1 = flat.sum(-1)
        s2 = (flat.unsqueeze(-2) @ flat.unsqueeze(-1)).view(n, c)
        count = flat.shape[-1] if per_sample else flat.shape[-1] * n
        if not per_sample:
            s1, s2 = s1.sum(0), s2.sum(0)
        mean = s1 / count
        var = (s2 / count - mean * mean).clamp_min(0)
        ctx.save_for_backward(x, mean)
        ctx.count, ctx.per_sample = count, per_sample
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor | None, grad_var: torch.Tensor | None):
        x, mean = ctx.saved_tensors
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
        c = 2 * grad_var / ctx.count
        b = grad_mean / ctx.count - c * mean
        shape = (x.shape[0], x.shape[1], 1, 1) if ctx.per_sample else (1, x.shape[1], 1, 1)
        return torch.addcmul(b.view(shape), x, c.view(shape)), None


class BNStatistics:
    """Records the input statistics of the BatchNorm layers of `model` while enabled (a context manager)."""

    def __init__(self, model: nn.Module, per_sample: bool = False):
        self.layers = [(name, m) for name, m in model.named_modules() if is_batchnorm(m) and m.running_var is not None]
        self.per_sample = per_sample
        self.means: list[torch.Tensor | None] = [None] * len(self.layers)
        self.vars: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles: list = []

    def __len__(self) -> int:
        return len(self.layers)

    def _hook(self, index: int):
        def hook(module, args):
            x = args[0]
            self.means[index], self.vars[index] = ChannelMoments.apply(x.float(), self.per_sample)

        return hook

    def __enter__(self) -> BNStatistics:
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def running(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The BN layers' running mean and variance (the targets of BNS matching)."""
        return [m.running_mean.float() for _, m in self.layers], [m.running_var.float() for _, m in self.layers]

    def deep_indices(self) -> list[int]:
        """The deeper half of BN layers used by FDDA (arXiv 2109.04186): l ≥ floor((N_BN + 1) / 2) − 2."""
        start = max(0, (len(self.layers) + 1) // 2 - 2)
        return list(range(start, len(self.layers)))


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
