"""Layer-wise rounding in network order: each conv/linear layer of a calibrated model rounded on the inputs the
already-quantized network gives it — to nearest, by GPTQ (`ptq.recon.gptq`), or kept as it is — and its bias
corrected on those same inputs.

The pass walks the reconstruction units (blocks and lone layers) in execution order. A unit's inputs are taken
from the quantized model once for all calibration images (every unit before it is final by then); the unit is then
run on them once per layer it holds, stopping at that layer, to gather the layer's input statistics (Σ x·xᵀ, Σ x)
with every layer before it already rounded and corrected. Memory is one unit's inputs and one layer's statistics.

Bias correction (DFQ arXiv 1906.04721, empirical form): b ← b + (W − Ŵ)·E[x], so that on the calibration inputs
the layer's mean output per channel is what the FP weights give on the same inputs. `analytic` takes E[x] from the
BatchNorm statistics of the layer producing x instead (`ptq.recon.analytic`), where it can be derived, and needs no
statistics pass for it.

Under torchrun each rank runs its share of the images and the statistics are summed over ranks before a layer is
rounded; every rank then holds rank 0's result. After each layer its weight, bias and GPTQ's error-compensated
weights are checkpointed in a work folder: rerunning the same job loads finished layers and continues.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ptq import distributed
from ptq._io import atomic_path
from ptq.config import BiasCorrection, GptqConfig, to_plain
from ptq.probe import hooked
from ptq.quant.modules import ActQuantizer, QuantLayer, quant_layers
from ptq.recon.gptq import (
    InputStatistics,
    SingularHessian,
    bias_shift,
    gptq_round,
    grid_quantizer,
    output_error,
    supported,
    weight_matrix,
)
from ptq.recon.units import find_units

log = logging.getLogger(__name__)
Progress = Callable[..., None]  # progress(label, done, total, note=None)


class Rounding(str, Enum):
    NEAREST = "nearest"  # the weight quantizer rounds the FP weight at every forward (round-to-nearest PTQ)
    GPTQ = "gptq"  # second-order rounding; the rounded weight replaces the layer's weight
    KEEP = "keep"  # the layer's weight as it is (already rounded, e.g. by reconstruction)


class _Stop(Exception):
    """Ends a forward pass once the layer of interest has seen its input."""


@dataclass
class LayerResult:
    name: str
    rounding: str  # what was done: gptq, nearest, kept, or nearest (fallback)
    rtn_error: float | None = None  # mean squared output error per column, rounding to nearest
    error: float | None = None  # ... with the rounding used
    bias_shift: float | None = None  # RMS of the bias change
    damp: float | None = None
    resumed: bool = False


def execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Quantized layers in the order a forward pass runs them."""
    order: list[str] = []
    with torch.no_grad(), hooked(quant_layers(model).items(), pre=lambda name, m, x: order.append(name)):
        model(example)
    return list(dict.fromkeys(order))


def chained(model: nn.Module, units: list, example: torch.Tensor) -> list[bool]:
    """Per unit, whether its input is exactly the previous unit's output: its inputs are then the previous unit's
    outputs on that unit's inputs, one unit's forward instead of a forward of everything before it."""
    ids: dict[str, tuple[int, int]] = {}
    modules = [(u.name, u.module(model)) for u in units]
    with torch.no_grad(), hooked(modules, post=lambda name, m, x, y: ids.setdefault(name, (id(x), id(y)))):
        model(example)
    flags = [False]
    for prev, unit in zip(units, units[1:], strict=False):
        a, b = ids.get(prev.name), ids.get(unit.name)
        flags.append(a is not None and b is not None and a[1] == b[0])
    return flags


def layer_input(layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
    """What the layer's weight multiplies: `x` after the layer's own input quantizer, if it has one."""
    q = layer.input_quantizer
    return q(x) if q is not None and q.enabled else x


def _fingerprint(rounding, config, bias, act_quant, names, images, first) -> str:
    key = {
        "rounding": rounding.value,
        "gptq": to_plain(config.__dict__),
        "bias": bias.value,
        "act_quant": act_quant,
        "layers": names,
        "images": images,
        "first": float(first.double().sum()),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _ensure_bias(layer: nn.Module) -> torch.Tensor:
    if layer.bias is None:
        w = layer.weight
        layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    return layer.bias


def _layer_state(layer: QuantLayer, start: torch.Tensor | None) -> dict[str, torch.Tensor]:
    state = {"weight": layer.layer.weight, "bias": _ensure_bias(layer.layer)}
    if start is not None:
        state["start"] = start
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _load_layer(path: Path, fp: str, layer: QuantLayer) -> tuple[bool, torch.Tensor | None]:
    """(loaded, GPTQ's start weights if stored) from a layer checkpoint of this job."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fp:
                return False, None
            saved = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError):
        return False, None
    weight = layer.layer.weight
    if set(saved) - {"weight", "bias", "start"} or saved.get("weight", torch.empty(0)).shape != weight.shape:
        return False, None
    with torch.no_grad():
        weight.copy_(saved["weight"])
        _ensure_bias(layer.layer).copy_(saved["bias"])
    start = saved.get("start")
    return True, None if start is None else start.to(weight)


@torch.no_grad()
def _unit_inputs(model: nn.Module, unit_module: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The unit's input for every calibration batch, from the model as it is."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        seen.append(args[0].detach())
        raise _Stop

    handle = unit_module.register_forward_pre_hook(hook)
    try:
        for x in batches:
            try:
                model(x)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(seen) != len(batches):
        raise RuntimeError(f"unit {unit_module.__class__.__name__} did not run on every batch")
    return seen


@torch.no_grad()
def _statistics(module: nn.Module, layer: QuantLayer, inputs: list[torch.Tensor], hessian: bool) -> InputStatistics:
    """The layer's input statistics over the unit's cached inputs (summed over ranks)."""
    stats = InputStatistics(layer.layer, hessian)

    def hook(module, args):
        stats.add(layer_input(layer, args[0]))
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        for x in inputs:
            try:
                module(x)
            except _Stop:
                pass
    finally:
        handle.remove()
    distributed.all_reduce_(stats.tensors())
    return stats


def _round_layer(
    name: str,
    layer: QuantLayer,
    stats: InputStatistics | None,
    fp_weight: torch.Tensor,
    rounding: Rounding,
    config: GptqConfig,
    bias: BiasCorrection,
    analytic_mean: torch.Tensor | None,
) -> tuple[LayerResult, torch.Tensor | None]:
    """Round one layer and correct its bias in place; returns what was done and GPTQ's start weights (or None)."""
    q = layer.weight_quantizer
    inner = layer.layer
    groups, rows, _ = weight_matrix(inner).shape
    w = weight_matrix(inner, fp_weight).double()
    nearest = weight_matrix(inner, q.quantize(fp_weight)).double()
    result = LayerResult(name, rounding.value)
    start = None
    rounded = nearest
    h = stats.hessian if stats is not None and stats.xxt is not None else None
    if rounding is Rounding.GPTQ:
        try:
            out = gptq_round(
                w, h, grid_quantizer(q.scale, q.zero_point, q.bits, groups, rows), config.block_size,
                config.act_order, config.damp,
            )  # fmt: skip
            rounded, start, result.damp = out.weight, out.continuous, out.damp
            inner.weight.copy_(rounded.reshape(inner.weight.shape).to(inner.weight.dtype))
            start = start.reshape(inner.weight.shape).to(inner.weight.dtype)
        except SingularHessian as e:
            log.warning("layer %s: %s; rounded to nearest instead", name, e)
            result.rounding = "nearest (fallback)"
    elif rounding is Rounding.KEEP:
        rounded = weight_matrix(inner, q.quantize(inner.weight)).double()
    if h is not None:
        result.rtn_error = output_error(w - nearest, h)
        result.error = output_error(w - rounded, h)
    mean = analytic_mean if bias is BiasCorrection.ANALYTIC else (stats.mean if stats is not None else None)
    if bias is not BiasCorrection.OFF and mean is not None:
        shift = bias_shift(w - rounded, mean)
        b = _ensure_bias(inner)
        b.add_(shift.to(b))
        result.bias_shift = float(shift.pow(2).mean().sqrt())
    return result, start


def round_layers(
    model: nn.Module,
    batches: list[torch.Tensor],
    rounding: Rounding,
    config: GptqConfig | None = None,
    bias: BiasCorrection = BiasCorrection.OFF,
    reference: nn.Module | None = None,
    work_dir: str | Path | None = None,
    progress: Progress | None = None,
    act_quant: bool = True,
    analytic_means: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Round every quantized layer of `model` in network order and correct its bias (see the module docstring).

    `reference`: an FP copy of the prepared model (`ptq.recon.engine.fp_reference`) holding each layer's FP weight,
    needed with `Rounding.KEEP` (the model's weights are rounded already); otherwise the model's own weights are FP.
    `act_quant`: whether activation quantizers are on while inputs are gathered. `analytic_means`: the layers' input
    means for `BiasCorrection.ANALYTIC` (`ptq.recon.analytic.analytic_input_means`). Returns a summary and, for GPTQ,
    each layer's error-compensated weights (where reconstruction may start its learned rounding)."""
    config = config or GptqConfig()
    layers = quant_layers(model)
    if rounding is Rounding.KEEP and reference is None:
        raise ValueError("Rounding.KEEP needs the FP reference model for the FP weights")
    example = batches[0][:1]
    order = execution_order(model, example)
    position = {name: i for i, name in enumerate(order)}
    units = find_units(model, example)
    links = chained(model, units, example)
    todo = [n for n in order if layers[n].weight_quantizer.enabled and layers[n].weight_quantizer.calibrated]
    unsupported = [n for n in todo if not supported(layers[n].layer)]
    if unsupported and (rounding is Rounding.GPTQ or bias is not BiasCorrection.OFF):
        listed = ", ".join(unsupported[:5]) + (" ..." if len(unsupported) > 5 else "")
        log.warning(
            "%d layer(s) of a kind second-order rounding and bias correction cannot express are rounded to nearest "
            "and keep their bias: %s", len(unsupported), listed,
        )  # fmt: skip
    work = [n for n in todo if n not in unsupported]
    need_stats = rounding is Rounding.GPTQ or bias is BiasCorrection.EMPIRICAL
    analytic = analytic_means
    if bias is BiasCorrection.ANALYTIC and analytic is None:
        raise ValueError("analytic bias correction needs the layers' input means (analytic_input_means)")
    w = distributed.world()
    images = sum(distributed.gather_objects(sum(b.shape[0] for b in batches)))
    fp = distributed.broadcast_object(_fingerprint(rounding, config, bias, act_quant, work, images, batches[0][:1]))
    folder = Path(work_dir) if work_dir is not None else None
    if folder is not None and w.main:
        folder.mkdir(parents=True, exist_ok=True)
    results: list[LayerResult] = []
    starts: dict[str, torch.Tensor] = {}
    states = {m: m.enabled for m in model.modules() if isinstance(m, ActQuantizer)}
    done = 0
    try:
        if not act_quant:
            for m in states:
                m.enabled = False
        previous: tuple[nn.Module, list[torch.Tensor]] | None = None  # the last unit and its inputs, if chained
        for k, unit in enumerate(units):
            names = sorted((n for n in unit.layers if n in work), key=position.__getitem__)
            module = unit.module(model)
            inputs = None
            if need_stats and previous is not None:
                with torch.no_grad():
                    inputs = [previous[0](x) for x in previous[1]]
            previous = None
            for name in names:
                layer = layers[name]
                path = folder / f"layer_{position[name]:04d}.safetensors" if folder is not None else None
                loaded, start = distributed.broadcast_object(
                    _load_layer(path, fp, layer) if path is not None and w.main and path.is_file() else (False, None)
                )
                if loaded:
                    results.append(LayerResult(name, rounding.value, resumed=True))
                else:
                    stats = None
                    if need_stats:
                        if inputs is None:
                            inputs = _unit_inputs(model, module, batches)
                        stats = _statistics(module, layer, inputs, hessian=rounding is Rounding.GPTQ)
                    fp_weight = (reference.get_submodule(name) if reference is not None else layer).layer.weight
                    with torch.no_grad():
                        result, start = _round_layer(
                            name, layer, stats, fp_weight.detach().clone(), rounding, config, bias,
                            None if analytic is None else analytic.get(name),
                        )  # fmt: skip
                    results.append(result)
                    if path is not None and w.main:
                        with atomic_path(path) as tmp:
                            save_file(_layer_state(layer, start), str(tmp), metadata={"fingerprint": fp, "layer": name})
                distributed.broadcast_([layer.layer.weight, _ensure_bias(layer.layer)])  # ranks stay identical
                if start is not None:
                    starts[name] = start
                done += 1
                if progress is not None:
                    progress("round layers", done, len(work), note=f"{name} ({done}/{len(work)})")
            if inputs is not None and k + 1 < len(units) and links[k + 1]:
                previous = (module, inputs)
            del inputs
    finally:
        for m, enabled in states.items():
            m.enabled = enabled
    return {
        "rounding": rounding.value,
        "bias_correction": bias.value,
        "act_quant": act_quant,
        "layers": len(work),
        "unsupported": unsupported,
        "gptq": to_plain(config.__dict__) if rounding is Rounding.GPTQ else None,
        "per_layer": [{k: v for k, v in r.__dict__.items() if v is not None and v is not False} for r in results],
    }, starts
