"""BatchNorm-statistic capture: forward pre-hooks on every BatchNorm input of any timm CNN.

For a batch x and BN layer l the hook computes, in one fused pass, the per-channel mean and biased variance of the
layer's input over (N, H, W) (per-batch) or over (H, W) for each image (per-sample, as ZeroQ). Only these reduced
statistics are kept — never the activations — and nothing moves between host and device.
"""

from __future__ import annotations

import torch
from torch import nn

from ptq.quant.fold import is_batchnorm


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
        dims = (2, 3) if self.per_sample else (0, 2, 3)

        def hook(module, args):
            x = args[0]
            var, mean = torch.var_mean(x.float(), dim=dims, unbiased=False)
            self.vars[index], self.means[index] = var, mean

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
