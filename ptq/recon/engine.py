"""One reconstruction engine for layers and blocks (AdaRound arXiv 2004.10568, BRECQ 2102.05426, QDrop 2203.05740).

For a unit of a prepared, calibrated model: its inputs come from the already-quantized model, its targets from the
same model with quantization off (the BN-folded FP network), both collected for the calibration images one unit at
a time. The unit's weight quantizers are replaced by AdaRound quantizers and trained with Adam to minimise

    L = Σ_c (ẑ − z)² averaged over (N, H, W)  +  λ · Σ (1 − |2h(V) − 1|^β)     (β: 20 → 2 after a 20% warm-up)

With QDrop (keep probability p < 1), every activation quantizer inside the unit and the unit's input keep their
quantized value element-wise with probability p, else pass the FP value. At the end rounding is made hard and the
result becomes the layers' weights, exactly on their quantizers' grids.

This module holds the per-unit loop; the method presets, resumable checkpoints, cache placement and the CLI build on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ptq.quant.modules import ActQuantizer, QuantLayer, WeightQuantizer, set_quant_state
from ptq.recon.adaround import AdaRoundQuantizer, beta_at
from ptq.recon.units import Unit

log = logging.getLogger(__name__)


CHECK_EVERY = 50  # iterations between finiteness checks of the loss


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the unit has run."""


@dataclass
class UnitData:
    q_inputs: torch.Tensor  # unit inputs from the quantized model
    fp_inputs: torch.Tensor  # unit inputs from the FP model (QDrop mixes them in)
    targets: torch.Tensor  # unit outputs of the FP model


@torch.no_grad()
def collect(
    model: nn.Module, unit: Unit, batches: Iterable[torch.Tensor], store: torch.device | str = "cpu"
) -> UnitData:
    """Inputs (quantized and FP) and FP outputs of one unit for every calibration batch; forwards stop at the unit."""
    module = unit.module(model)
    seen: dict[str, list[torch.Tensor]] = {"q_in": [], "fp_in": [], "fp_out": []}
    mode: dict[str, bool] = {}

    def hook(mod, args, output):
        if mode["quant"]:
            seen["q_in"].append(args[0].detach().to(store))
        else:
            seen["fp_in"].append(args[0].detach().to(store))
            seen["fp_out"].append(output.detach().to(store))
        raise _Stop

    states = {m: m.enabled for m in model.modules() if isinstance(m, (ActQuantizer, WeightQuantizer))}
    handle = module.register_forward_hook(hook)
    try:
        for x in batches:
            for quant in (False, True):
                mode["quant"] = quant
                set_quant_state(model, quant, quant)
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        handle.remove()
        for m, enabled in states.items():
            m.enabled = enabled
    return UnitData(torch.cat(seen["q_in"]), torch.cat(seen["fp_in"]), torch.cat(seen["fp_out"]))


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ over channels of the squared error, averaged over the other dimensions."""
    return (out - target).square().sum(dim=1).mean()


@torch.no_grad()
def unit_error(model: nn.Module, unit: Unit, data: UnitData, batch: int = 64) -> float:
    module = unit.module(model)
    total = 0.0
    for i in range(0, len(data.q_inputs), batch):
        out = module(data.q_inputs[i : i + batch])
        total += float(reconstruction_loss(out, data.targets[i : i + batch])) * out.shape[0]
    return total / len(data.q_inputs)


def reconstruct_unit(
    model: nn.Module,
    unit: Unit,
    data: UnitData,
    iters: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    reg_weight: float = 0.01,
    keep_prob: float = 1.0,
    seed: int = 0,
    step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """AdaRound (+ QDrop when keep_prob < 1) on one unit; its layers' weights end hard-rounded on the grid."""
    module = unit.module(model)
    device = next(module.parameters()).device
    layers: list[QuantLayer] = [model.get_submodule(name) for name in unit.layers]
    rounders = []
    for layer in layers:
        wq = layer.weight_quantizer
        rounders.append(AdaRoundQuantizer(layer.weight, wq.scale, wq.zero_point, wq.bits).to(device))
    originals = [layer.weight_quantizer for layer in layers]
    inner = [m for m in module.modules() if isinstance(m, ActQuantizer) and m.enabled]
    g = torch.Generator(device=data.q_inputs.device).manual_seed(seed)
    opt = torch.optim.Adam([r.v for r in rounders], lr=lr)
    n = len(data.q_inputs)
    good = [r.v.detach().clone() for r in rounders]  # last state whose loss was finite
    diverged = False
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        for layer, rounder in zip(layers, rounders, strict=True):
            layer.weight_quantizer = rounder
            rounder.enabled = True  # QuantLayer only calls a quantizer that is enabled
        for q in inner:
            q.keep_prob = keep_prob
        with torch.random.fork_rng(devices=devices):  # QDrop's masks: reproducible per unit, e.g. on resume
            torch.manual_seed(seed)
            for it in range(iters):
                idx = torch.randint(n, (min(batch_size, n),), generator=g, device=data.q_inputs.device)
                x_q, x_fp, target = (t[idx].to(device) for t in (data.q_inputs, data.fp_inputs, data.targets))
                x = torch.where(torch.rand_like(x_q) < keep_prob, x_q, x_fp) if keep_prob < 1 else x_q
                rec = reconstruction_loss(module(x), target)
                beta = beta_at(it, iters)
                reg = sum(r.regulariser(beta) for r in rounders) if beta is not None else 0.0
                loss = rec + reg_weight * reg
                if (it + 1) % CHECK_EVERY == 0 or it + 1 == iters or it == 0:  # one host sync per check
                    if not torch.isfinite(loss):
                        diverged = True
                        break
                    good = [r.v.detach().clone() for r in rounders]
                    if step is not None:
                        step(it + 1, float(rec.detach()))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for q in inner:
            q.keep_prob = None
        with torch.no_grad():
            for layer, rounder, original, v in zip(layers, rounders, originals, good, strict=True):
                if diverged:
                    rounder.v.copy_(v)
                layer.layer.weight.copy_(rounder.hard_weight())
                layer.weight_quantizer = original
    if diverged:
        log.warning("unit %s: loss became NaN/inf; kept its last good state and went on", unit.name)
    return {"reconstruction_error": unit_error(model, unit, data), "diverged": diverged}
