"""Per-layer sensitivity to weight quantization (HAWQ-v2, arXiv 1911.03852; LCPAQ).

    Ω_i(b) = (Tr H_i / n_i) · ||Q_b(W_i) − W_i||²

H_i is the Hessian, w.r.t. layer i's n_i weights, of L = KL(p_FP ‖ p_W): the divergence of the network's prediction
from the FP model's own (so no labels are needed and synthetic images serve). At the FP weights ∇L = 0 and H is the
positive semi-definite Gauss-Newton matrix, which for a softmax output is the Fisher information
E_x E_{y∼p_FP(·|x)}[g gᵀ], g = ∇_W log p_y(x). Two estimators of Tr H_i:
- `hutchinson`: E_v[vᵀHv] with Rademacher v (entries ±1) and Hv by double backprop, ∇_W(∇_W L · v); one probe vector
  spans all layers at once, and v_iᵀ(Hv)_i estimates Tr H_ii because the cross-layer terms vanish in expectation —
  but only in expectation: with few probes a small layer's estimate drowns in them.
- `fisher` (default): ||∇_{W_i} Σ_n r_n log p_{y_n}(x_n)||² with y_n drawn from the FP prediction and random signs
  r_n = ±1, whose expectation is Σ_n E_y||g_{n,i}||² = N·Tr H_i; one ordinary backward per probe, ≥ 0 per layer.
Q_b is the layer's own weight quantizer (per-channel Lp search) at b bits. ½ Σ_i Ω_i(b_i) is the second-order
prediction of the KL the whole allocation adds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptq.config import HIGH_BITS, BitConvention, LayerKind, MixedConfig, QuantConfig, TraceEstimator
from ptq.export.packing import packed_size
from ptq.quant.calibrate import weight_observer
from ptq.quant.functional import channel_view, fake_quantize
from ptq.quant.modules import Quantizer, act_quantizers, quant_layers, set_quant_state
from ptq.quant.prepare import Placement, layer_macs

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int | None], None]
QPARAM_BYTES = 5  # per output channel: an fp32 scale and a uint8 zero point


@dataclass
class LayerSensitivity:
    """One quantized layer: its cost at each width and its sensitivity Ω(b) = trace · perturbation[b]."""

    name: str
    kind: LayerKind
    numel: int
    channels: int
    macs: int  # multiply-accumulates per image
    in_bits: int  # bits of the activation it reads (8 for the image)
    allowed: list[int]  # widths it may take (hardware limits and the first/last-layer convention)
    trace: float = 0.0  # average Hessian trace, Tr H_i / n_i
    perturbation: dict[int, float] = field(default_factory=dict)  # b → ||Q_b(W) − W||²

    def omega(self, bits: int) -> float:
        return self.trace * self.perturbation[bits]

    def weight_bytes(self, bits: int) -> int:
        return packed_size(self.numel, bits) + QPARAM_BYTES * self.channels

    def bops(self, bits: int) -> int:
        return self.macs * bits * self.in_bits


@dataclass
class SensitivityTable:
    model: str
    convention: BitConvention
    candidates: list[int]
    layers: list[LayerSensitivity]
    images: int = 0
    probes: int = 0
    estimator: TraceEstimator = TraceEstimator.FISHER
    seconds: float = 0.0  # the whole pass
    trace_seconds: float = 0.0  # of which the Hessian traces (the rest: ||Q_b(W) − W||² for every width)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["convention"] = self.convention.value
        data["estimator"] = TraceEstimator(self.estimator).value
        for layer in data["layers"]:
            layer["kind"] = layer["kind"].value
        return {"type": "ptq.SensitivityTable", "version": 1, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityTable:
        data = {k: v for k, v in data.items() if k not in ("type", "version")}
        layers = [
            LayerSensitivity(
                **{**layer, "kind": LayerKind(layer["kind"])},
            )
            for layer in data.pop("layers")
        ]
        for layer in layers:
            layer.perturbation = {int(b): float(v) for b, v in layer.perturbation.items()}
        data["convention"] = BitConvention(data["convention"])
        data["estimator"] = TraceEstimator(data.get("estimator", "hutchinson"))
        return cls(**data, layers=layers)

    def uniform_bits(self, bits: int) -> dict[str, int]:
        """Every layer at `bits` where allowed, else the nearest allowed width (first/last layers stay 8-bit)."""
        return {
            layer.name: bits if bits in layer.allowed else min(layer.allowed, key=lambda b: (abs(b - bits), -b))
            for layer in self.layers
        }


def layer_kind(layer: nn.Module) -> LayerKind:
    if isinstance(layer, nn.Linear):
        return LayerKind.LINEAR
    if layer.groups == 1:
        return LayerKind.POINTWISE if all(k == 1 for k in layer.kernel_size) else LayerKind.CONV
    return LayerKind.DEPTHWISE if layer.groups == layer.in_channels else LayerKind.GROUPED


def allowed_bits(kind: LayerKind, config: MixedConfig, first_or_last: bool, convention: BitConvention) -> list[int]:
    if first_or_last and convention is not BitConvention.ALL:
        return [HIGH_BITS]
    limit = config.kind_bits.get(kind.value)
    return [b for b in config.w_candidates if limit is None or b in limit]


def describe_layers(model: nn.Module, config: MixedConfig, convention: BitConvention) -> list[LayerSensitivity]:
    """Shapes, kinds, MACs per image (one probe forward) and allowed widths of every quantized layer, in order."""
    layers = quant_layers(model)
    placement: Placement = model.ptq_state.placement
    quantizers = act_quantizers(model)
    macs = layer_macs(model)
    ends = set(placement.first_layers) | {placement.last_layer}
    table = []
    for name, layer in layers.items():
        producer = placement.input_producer.get(name)
        if layer.input_quantizer is not None:
            in_bits = layer.input_quantizer.bits
        else:
            in_bits = quantizers[producer].bits if producer in quantizers else HIGH_BITS  # the image: 8
        kind = layer_kind(layer.layer)
        table.append(
            LayerSensitivity(
                name=name,
                kind=kind,
                numel=layer.weight.numel(),
                channels=layer.weight_quantizer.scale.numel(),
                macs=macs.get(name, 0),
                in_bits=in_bits,
                allowed=allowed_bits(kind, config, name in ends, convention),
            )
        )
    return table


@torch.no_grad()
def weight_perturbations(model: nn.Module, quant: QuantConfig, widths: Iterable[int]) -> dict[str, dict[int, float]]:
    """||Q_b(W) − W||² per layer and width, with the same observer (Lp search per channel) calibration uses."""
    out = {}
    for name, layer in quant_layers(model).items():
        w = layer.weight.detach()
        obs = weight_observer(quant)
        obs.observe(w)
        errors = {}
        for b in widths:
            scale, zero_point = obs.calculate_qparams(b, quant.w_symmetric)
            wq = fake_quantize(w, channel_view(scale, w.ndim), channel_view(zero_point, w.ndim), b)
            errors[b] = float((wq - w).double().pow(2).sum())
        out[name] = errors
    return out


def _rademacher(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype).mul_(2).sub_(1)


def _hutchinson(model, weights, x, probes, generator) -> torch.Tensor:
    """Σ over probes of v_iᵀ(Hv)_i per layer, H the Hessian of the batch-mean KL (double backprop)."""
    logp = F.log_softmax(model(x).float(), dim=1)
    target = logp.detach()
    loss = (target.exp() * (target - logp)).sum(1).mean()
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    sums = torch.zeros(len(weights), dtype=torch.float64, device=x.device)
    for k in range(probes):
        vs = [_rademacher(w, generator) for w in weights]
        hvs = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=k < probes - 1)
        sums += torch.stack([(v * hv).sum().double() for v, hv in zip(vs, hvs, strict=True)])
    return sums * x.shape[0]  # the batch mean back to a sum over images


def _fisher(model, weights, x, probes, generator) -> torch.Tensor:
    """Σ over probes of ||∇_{W_i} Σ_n r_n log p_{y_n}(x_n)||² per layer, y_n drawn from the FP prediction and r_n = ±1:
    in expectation Σ_n E_y||∇ log p_y(x_n)||², i.e. Σ_n Tr H_n (at the FP point the KL's Hessian is the Fisher)."""
    logp = F.log_softmax(model(x).float(), dim=1)
    probs = logp.detach().exp()
    sums = torch.zeros(len(weights), dtype=torch.float64, device=x.device)
    for k in range(probes):
        y = torch.multinomial(probs, 1, generator=generator)
        r = torch.randint(0, 2, (x.shape[0], 1), generator=generator, device=x.device).float().mul_(2).sub_(1)
        grads = torch.autograd.grad((r * logp.gather(1, y)).sum(), weights, retain_graph=k < probes - 1)
        sums += torch.stack([g.double().pow(2).sum() for g in grads])
    return sums


def hessian_traces(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    probes: int = 4,
    seed: int = 0,
    max_images: int | None = None,
    estimator: TraceEstimator = TraceEstimator.FISHER,
    progress: Progress | None = None,
) -> tuple[dict[str, float], int]:
    """Average Hessian trace Tr H_i / n_i of KL(p_FP ‖ p_W) per quantized layer, and the number of images used.

    The model runs unquantized (its weights are the FP ones, BatchNorm folded), so the Hessian is taken at the FP
    point; each batch's graph is built once and reused by every probe. `hutchinson`: one Rademacher vector over all
    layers per probe, Hv by double backprop (cross-layer terms vanish only in expectation, so a small layer's
    estimate is noisy and can come out negative: it is clamped at 0). `fisher`: the same trace as the expected
    squared gradient of log p_y with y drawn from the FP prediction, one backward per probe, ≥ 0 layer by layer."""
    layers = quant_layers(model)
    names = list(layers)
    weights = [layers[n].layer.weight for n in names]
    device = weights[0].device
    generator = torch.Generator(device=device).manual_seed(seed)
    flags = {p: p.requires_grad for p in model.parameters()}
    state = [(q, q.enabled) for q in model.modules() if isinstance(q, Quantizer)]
    totals = torch.zeros(len(weights), dtype=torch.float64, device=device)
    step = _fisher if TraceEstimator(estimator) is TraceEstimator.FISHER else _hutchinson
    seen = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        set_quant_state(model, weights=False, activations=False)
        for i, x in enumerate(batches):
            if max_images is not None and seen >= max_images:
                break
            if max_images is not None:
                x = x[: max_images - seen]
            totals += step(model, weights, x, probes, generator)
            seen += x.shape[0]
            if progress is not None:
                progress("Hessian traces", i + 1, total)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for q, enabled in state:
            q.enabled = enabled
    if seen == 0:
        raise ValueError("no calibration images reached the sensitivity pass")
    traces = (totals / (seen * probes)).clamp_(min=0).cpu().tolist()
    return {n: t / w.numel() for n, t, w in zip(names, traces, weights, strict=True)}, seen


def measure_sensitivity(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    model_name: str,
    quant: QuantConfig,
    config: MixedConfig,
    progress: Progress | None = None,
) -> SensitivityTable:
    """The sensitivity table of a prepared (uncalibrated or calibrated) model on calibration `batches`."""
    start = time.perf_counter()
    layers = describe_layers(model, config, quant.first_last_bits)
    traces, seen = hessian_traces(model, batches, config.probes, config.seed, config.images, config.trace, progress)
    trace_seconds = round(time.perf_counter() - start, 3)
    widths = sorted({b for layer in layers for b in layer.allowed})
    perturbations = weight_perturbations(model, quant, widths)
    for layer in layers:
        layer.trace = traces[layer.name]
        layer.perturbation = {b: perturbations[layer.name][b] for b in layer.allowed}
    seconds = round(time.perf_counter() - start, 3)
    log.info("sensitivity of %d layers on %d images in %.1fs", len(layers), seen, seconds)
    return SensitivityTable(
        model_name, quant.first_last_bits, list(config.w_candidates), layers, seen, config.probes, config.trace,
        seconds, trace_seconds,
    )  # fmt: skip
