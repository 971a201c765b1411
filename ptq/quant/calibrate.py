"""Calibration: fix every quantizer's range from the weights and from calibration images (round-to-nearest PTQ).

Weights: one observer per layer over the (folded) weight, per output channel by default.
Activations: with weights already quantized, each activation quantizer's observer records its input over all
calibration batches (activation quantization off, so every quantizer sees the same FP-activation network);
then scale and zero point are computed once. Ranges are fixed afterwards.
Under torchrun every rank observes all images and the range searches are shared out (quantizer i on rank
i mod world size), each result then sent to every rank: the ranges one process computes, in less time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ptq import distributed
from ptq.config import ObserverKind, QuantConfig, WeightGranularity
from ptq.quant.modules import act_quantizers, quant_layers, set_quant_state
from ptq.quant.observers import Granularity, Observer, PerChannel, PerTensor, make_observer

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int | None], None]  # (stage, done, total)


def _observer(config: QuantConfig, kind: ObserverKind, granularity: Granularity) -> Observer:
    kwargs = {}
    if kind is ObserverKind.LP:
        kwargs = {"p": config.lp_p, "num_candidates": config.lp_candidates}
    elif kind is ObserverKind.PERCENTILE:
        kwargs = {"percentile": config.percentile}
    return make_observer(kind, granularity, **kwargs)


def weight_observer(config: QuantConfig) -> Observer:
    granularity = PerChannel(0) if config.w_granularity is WeightGranularity.CHANNEL else PerTensor()  # axis 0
    return _observer(config, config.w_observer, granularity)


@torch.no_grad()
def calibrate_weights(model: nn.Module, config: QuantConfig, progress: Progress | None = None) -> None:
    """Each layer's weight range at its own quantizer's width (which mixed precision may have set per layer)."""
    layers = list(quant_layers(model).values())
    for i, layer in enumerate(layers):
        q = layer.weight_quantizer
        if distributed.owns(i):
            obs = weight_observer(config)
            obs.observe(layer.weight)
            q.set_qparams(*obs.calculate_qparams(q.bits, config.w_symmetric))
        q.calibrated = True
        if progress is not None:
            progress("weight ranges", i + 1, len(layers))
    distributed.share_owned([(layer.weight_quantizer.scale, layer.weight_quantizer.zero_point) for layer in layers])


@torch.no_grad()
def calibrate_activations(
    model: nn.Module, batches: Iterable[torch.Tensor], config: QuantConfig, progress: Progress | None = None
) -> int:
    """Observe activation ranges over `batches` (already on the model's device); return the number of images seen."""
    quantizers = act_quantizers(model)
    for q in quantizers.values():
        q.observer = _observer(config, config.a_observer, PerTensor())
    set_quant_state(model, weights=config.quantize_weights, activations=False)
    seen = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        for i, x in enumerate(batches):
            model(x)
            seen += x.shape[0]
            if progress is not None:
                progress("observe activations", i + 1, total)
    finally:
        observers = {name: q.observer for name, q in quantizers.items()}
        for q in quantizers.values():
            q.observer = None
    for i, (name, q) in enumerate(quantizers.items()):
        obs = observers[name]
        if obs is None or obs.lo is None:
            log.warning("activation quantizer %s saw no data and stays disabled", name)
            continue
        if distributed.owns(i):
            q.set_qparams(*obs.calculate_qparams(q.bits, config.a_symmetric))
        q.calibrated = True
        if progress is not None:
            progress("activation ranges", i + 1, len(quantizers))
    distributed.share_owned([(q.scale, q.zero_point) for q in quantizers.values()])
    return seen


def calibrate(
    model: nn.Module, batches: Iterable[torch.Tensor], config: QuantConfig, progress: Progress | None = None
) -> nn.Module:
    """Round-to-nearest PTQ: weight ranges, then activation ranges; quantizers switched on per the config."""
    calibrate_weights(model, config, progress)
    calibrate_activations(model, batches, config, progress)
    return apply_quant_state(model, config)


def apply_quant_state(model: nn.Module, config: QuantConfig) -> nn.Module:
    set_quant_state(model, config.quantize_weights, config.quantize_activations)
    for q in act_quantizers(model).values():
        q.enabled = q.enabled and q.calibrated
    return model
