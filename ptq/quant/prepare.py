"""`prepare(model, config)`: turn any timm CNN into a fake-quantized model, without graph tracing.

Steps (each explicit; nothing is initialised lazily in `forward`):
1. BatchNorm folded into its conv where legal (`ptq.quant.fold`); optionally cross-layer equalization of the folded
   weights (`ptq.quant.equalize`).
2. Every conv/linear becomes a `QuantLayer` (per-output-channel weight quantizer).
3. Activation quantizers on outputs (README: What "W4A4" means here): after every nonlinearity (not the
   sigmoid/tanh gates of attention modules) and after the multiply of squeeze-excite modules.
4. A one-example probe follows tensor identities through the network. timm's efficientnet-family blocks (they carry
   `has_skip`) whose output is not already quantized — the residual add, or a linear bottleneck — get an output
   quantizer; ResNet/RegNet blocks end with an activation after the add and need none. Then any layer (except the
   first, which sees the image) whose input is still not the output of an activation quantizer — after pooling, after
   a BatchNorm that could not be folded, in an unknown block — gets an input quantizer, so every matmul input is
   quantized whatever the architecture. Grid-preserving modules (identity, dropout, max-pool, flatten, ReLU) pass
   "already quantized" through. With `quantize_layer_outputs` (for integer runtimes: every conv then reads and
   writes integers), every layer but the last whose output is still not quantized — the last conv of a residual
   branch, a downsampling shortcut — gets an output quantizer too, and the layers that read the image get an 8-bit
   input quantizer.
5. The first/last-layer bit convention is applied, and the quantizers are switched per the config.
The network output is never quantized. Weight and activation quantizers are uncalibrated until `calibrate` runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ptq import arch
from ptq.arch import GRID_PRESERVING, SQUEEZE_EXCITE
from ptq.config import HIGH_BITS, BitConvention, QuantConfig
from ptq.probe import example_input, hooked
from ptq.quant.equalize import ChannelClamp, equalize
from ptq.quant.fold import fold_batchnorm, replace_module
from ptq.quant.modules import (
    ActQuantizer,
    OutputQuant,
    QuantLayer,
    act_quantizers,
    clamp_range,
    quant_layers,
    set_quant_state,
)

NONLINEARITIES = arch.NONLINEARITIES + (ChannelClamp,)  # equalization's per-channel clip is one too


@dataclass
class Placement:
    """What the probe found: which layers see the image or make the output, and where quantizers sit."""

    first_layers: list[str] = field(default_factory=list)
    last_layer: str | None = None
    act_order: list[str] = field(default_factory=list)  # activation quantizers in execution order
    input_producer: dict[str, str | None] = field(default_factory=dict)  # layer → quantizer whose output it reads
    unquantized_blocks: list[str] = field(default_factory=list)  # probed blocks whose output is not quantized


@dataclass
class PreparedState:
    """What `prepare` records on the model it returns, as `model.ptq_state`: where the quantizers sit, the example
    shape it probed with, its config, where the FP weights came from (`load_model`'s note, if any) and, once a job
    has set it, the model's data config."""

    placement: Placement
    example_shape: tuple[int, ...]
    config: QuantConfig
    weights: str | None = None
    data_config: dict | None = None


def _gate_modules(model: nn.Module) -> set[int]:
    """Modules inside squeeze-excite/attention gates that must not get an output quantizer of their own."""
    gates = set()
    for m in model.modules():
        if isinstance(m, SQUEEZE_EXCITE):
            gate = getattr(m, "gate", None)
            if isinstance(gate, nn.Module):
                gates.add(id(gate))
    return gates


def _wrap_outputs(model: nn.Module, names: list[str], a_bits: int) -> None:
    # deepest first, so that a block's name still resolves after its children were wrapped
    for name in sorted(names, key=lambda n: n.count("."), reverse=True):
        replace_module(model, name, OutputQuant(model.get_submodule(name), ActQuantizer(a_bits)))


def _nonlinearities_and_se(model: nn.Module) -> list[str]:
    gates = _gate_modules(model)
    return [
        name
        for name, m in model.named_modules()
        if name and ((isinstance(m, NONLINEARITIES) and id(m) not in gates) or isinstance(m, SQUEEZE_EXCITE))
    ]


def _probe(model: nn.Module, example: torch.Tensor, blocks: frozenset[str] = frozenset()) -> Placement:
    layers = quant_layers(model)
    quantizers = act_quantizers(model)
    grid: dict[int, str] = {}  # tensor id → name of the quantizer whose value it carries
    placement = Placement()
    executed: list[str] = []
    watched = [
        (n, m)
        for n, m in model.named_modules()
        if n in layers or n in quantizers or n in blocks or isinstance(m, GRID_PRESERVING)
    ]

    def pre(name, module, x):
        if name in layers:
            if x is example:
                placement.first_layers.append(name)
            placement.input_producer[name] = grid.get(id(x))

    def post(name, module, x, y):
        if name in quantizers:
            grid[id(y)] = name
            placement.act_order.append(name)
        elif name in layers:
            executed.append(name)
        elif name in blocks:
            if id(y) not in grid:
                placement.unquantized_blocks.append(name)
        elif id(x) in grid:
            grid[id(y)] = grid[id(x)]

    with torch.no_grad(), hooked(watched, pre=pre, post=post):
        model(example)
    placement.last_layer = executed[-1] if executed else None
    return placement


def output_quantizers(model: nn.Module, example: torch.Tensor) -> dict[str, str | None]:
    """For every layer, the activation quantizer its output reaches directly or through a clamp (ReLU, ReLU6) or
    a grid-preserving module, or None: e.g. the last conv of a residual branch, whose output meets the add. A tensor
    changed in place on the way (timm's `x += shortcut`) no longer counts as the layer's output: tensors are
    followed by identity and version counter."""
    layers = quant_layers(model)
    pending: dict[int, tuple[str, int]] = {}  # tensor id → (layer whose unquantized output it is, tensor version)
    found: dict[str, str | None] = {}
    watched = [
        (n, m)
        for n, m in model.named_modules()
        if n in layers or isinstance(m, (ActQuantizer, *GRID_PRESERVING)) or clamp_range(m) is not None
    ]
    clean: dict[int, str] = {}  # tensor id → layer, for inputs of passing modules that arrived unchanged

    def carried(x: torch.Tensor) -> str | None:
        entry = pending.get(id(x))
        return entry[0] if entry is not None and entry[1] == x._version else None

    def pre(name, module, x):
        layer = carried(x)
        if isinstance(module, ActQuantizer):
            if layer is not None and found.get(layer) is None:
                found[layer] = name  # the first quantizer to read it
        elif name not in layers and layer is not None:
            clean[id(x)] = layer

    def post(name, module, x, y):
        if name in layers:
            pending[id(y)] = (name, y._version)
            found.setdefault(name, None)
        elif not isinstance(module, ActQuantizer) and id(x) in clean:
            pending[id(y)] = (clean.pop(id(x)), y._version)  # a clamp in place bumps the version: re-recorded

    with torch.no_grad(), hooked(watched, pre=pre, post=post):
        model(example)
    return found


def _apply_bit_convention(model: nn.Module, placement: Placement, convention: BitConvention) -> None:
    if convention is BitConvention.ALL:
        return
    layers = quant_layers(model)
    quantizers = act_quantizers(model)
    for name in placement.first_layers:
        layers[name].weight_quantizer.bits = HIGH_BITS
    if convention is BitConvention.BRECQ and placement.act_order:
        quantizers[placement.act_order[0]].bits = HIGH_BITS  # the output of the first conv
    if placement.last_layer is not None:
        last = layers[placement.last_layer]
        last.weight_quantizer.bits = HIGH_BITS
        if convention is BitConvention.QDROP:
            if last.input_quantizer is not None:
                last.input_quantizer.bits = HIGH_BITS
            elif placement.input_producer.get(placement.last_layer):
                quantizers[placement.input_producer[placement.last_layer]].bits = HIGH_BITS


def prepare(model: nn.Module, config: QuantConfig, example: torch.Tensor | None = None) -> nn.Module:
    """Return a quantized copy of `model` (the original is left untouched); see the module docstring for the steps."""
    model = copy.deepcopy(model).eval()
    example = example if example is not None else example_input(model)
    device = next(model.parameters()).device
    if config.fold_bn:
        fold_batchnorm(model, example)
    if config.equalize:
        equalize(model, example)
    targets = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not targets:
        raise ValueError("the model has no Conv2d or Linear layer to quantize")
    for name in targets:
        replace_module(model, name, QuantLayer(model.get_submodule(name), config.w_bits, config.w_granularity))
    _wrap_outputs(model, _nonlinearities_and_se(model), config.a_bits)
    blocks = frozenset(n for n, m in model.named_modules() if n and getattr(m, "has_skip", None) is not None)
    _wrap_outputs(model, _probe(model, example, blocks).unquantized_blocks, config.a_bits)
    placement = _probe(model, example)
    if config.quantize_layer_outputs:
        reached = output_quantizers(model, example)
        bare = [n for n, q in reached.items() if q is None and n != placement.last_layer]
        _wrap_outputs(model, bare, config.a_bits)
        placement = _probe(model, example)
    for name, layer in quant_layers(model).items():
        if name in placement.first_layers:
            if config.quantize_layer_outputs:  # the image too: an integer runtime then runs the stem conv in int8
                layer.input_quantizer = ActQuantizer(HIGH_BITS)
        elif placement.input_producer.get(name) is None:
            layer.input_quantizer = ActQuantizer(config.a_bits)
    # the input quantizers just added change nothing upstream, so the placement found above still holds
    _apply_bit_convention(model, placement, config.first_last_bits)
    model.to(device)  # the quantizers were created on the CPU
    model.ptq_state = PreparedState(placement, tuple(example.shape), config, getattr(model, "ptq_weights_source", None))
    return set_quant_state(model, config.quantize_weights, config.quantize_activations)


def layer_bits(model: nn.Module) -> dict[str, dict[str, int | None]]:
    """Per quantized layer: weight bits and input-quantizer bits (None: the layer reads an already-quantized value)."""
    return {
        name: {
            "w_bits": layer.weight_quantizer.bits,
            "in_bits": layer.input_quantizer.bits if layer.input_quantizer is not None else None,
        }
        for name, layer in quant_layers(model).items()
    }


def layer_macs(model: nn.Module) -> dict[str, int]:
    """Multiply-accumulates per image of every quantized layer (one probe forward at the prepared example shape)."""
    layers = quant_layers(model)
    macs: dict[str, int] = {}

    def record(name, module, x, y):
        weight = module.layer.weight
        macs[name] = (y.numel() // y.shape[0]) * (weight.numel() // weight.shape[0])

    example = torch.zeros((1, *model.ptq_state.example_shape[1:]), device=next(model.parameters()).device)
    with torch.no_grad(), hooked(layers.items(), post=record):
        model(example)
    return macs
