"""A unit's cached tensors for reconstruction: its inputs from the quantized model (and, for QDrop, from the FP
model) and its FP targets (and Fisher weights), collected for the whole calibration set one unit at a time, in any
storage dtype and place; mini-batches are read straight from the cache (QDrop's FP/quantized mix in one kernel)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptq._fuse import fused
from ptq.quant.functional import _as_weights, keep_mask, mix
from ptq.quant.modules import ActQuantizer, WeightQuantizer, set_quant_state
from ptq.recon.units import Unit


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the unit has run."""


@fused
def _gather_mix(fp, quantized, idx, keep):
    """QDrop's input for rows `idx` of the (rows, elements) caches: lerp(FP, quantized, keep) in float32."""
    return torch.lerp(fp[idx].float(), quantized[idx].float(), keep.to(torch.float32))


@dataclass
class UnitData:
    """A unit's cached tensors for the whole calibration set, in any storage dtype and place."""

    q_inputs: torch.Tensor  # unit inputs from the quantized model
    fp_inputs: torch.Tensor | None  # unit inputs from the FP model (only QDrop mixes them in)
    targets: torch.Tensor  # unit outputs of the FP model
    fisher: torch.Tensor | None = None  # per-element loss weights (squared task-loss gradient, mean 1)

    def __len__(self) -> int:
        return self.q_inputs.shape[0]

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.q_inputs, self.fp_inputs, self.targets, self.fisher) if t is not None]

    def fused(self, device: torch.device) -> bool:
        """Whether the cache lies on `device`, so that kernels can read a mini-batch's rows straight from it."""
        return self.q_inputs.device == device

    def inputs(self, idx: torch.Tensor, device: torch.device, keep_prob: float = 1.0) -> torch.Tensor:
        """The unit's input for rows `idx`, float32 on `device`: the quantized model's, or with `keep_prob` p < 1
        (QDrop) each element quantized with probability p and FP otherwise, gathered and mixed in one pass."""
        mixing = self.fp_inputs is not None and keep_prob < 1
        if not self.fused(device):
            idx = idx.to(self.q_inputs.device)
            x_q = self.q_inputs[idx].to(device, torch.float32, non_blocking=True)
            if not mixing:
                return x_q
            x_fp = self.fp_inputs[idx].to(device, torch.float32, non_blocking=True)
            return mix(x_fp, x_q, keep_mask(x_q, keep_prob))
        if not mixing:
            return self.q_inputs[idx].float()
        shape = (idx.numel(), *self.q_inputs.shape[1:])
        keep = _as_weights(keep_mask(self.q_inputs, keep_prob, shape))
        rows = len(self)
        mixed = _gather_mix(self.fp_inputs.view(rows, -1), self.q_inputs.view(rows, -1), idx, keep.view(len(idx), -1))
        return mixed.view(shape)

    def targets_for(
        self, idx: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(targets, Fisher weights or None, rows): the rows `idx` of the first two are the mini-batch's. On the
        compute device they are the whole cache, read by the loss kernels directly; elsewhere the mini-batch's rows
        are copied over (and `rows` counts them)."""
        if self.fused(device):
            return self.targets, self.fisher, idx
        idx = idx.to(self.targets.device)
        moved = [None if t is None else t[idx].to(device, torch.float32, non_blocking=True)
                 for t in (self.targets, self.fisher)]  # fmt: skip
        return moved[0], moved[1], torch.arange(len(idx), device=device)


def fp_reference(model: nn.Module) -> nn.Module:
    """An FP copy of a prepared model (quantization off, nothing learns) whose forwards give the targets.

    Make it before any unit is reconstructed: reconstruction writes each unit's rounded weights into the model's
    layers, so the model with its quantizers switched off is no longer the FP network once a unit is done."""
    reference = copy.deepcopy(model)
    set_quant_state(reference, False, False)
    return reference.requires_grad_(False)


@torch.no_grad()
def collect(
    model: nn.Module,
    unit: Unit,
    batches: Iterable[torch.Tensor],
    store: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    fp_inputs: bool = True,
    fisher: bool = False,
    reference: nn.Module | None = None,
) -> UnitData:
    """Inputs (quantized and, if asked, FP) and FP outputs of one unit for every calibration batch.

    The quantized inputs come from `model` as it is (its quantizers as they are set); the FP inputs and outputs
    from `reference` (`fp_reference`), or, without one, from `model` with every quantizer off — the FP network
    only while no unit of `model` has been reconstructed yet. Forwards stop at the unit, except with `fisher`: the
    FP forward then runs to the logits and back, and the squared gradient of the cross-entropy with the FP model's
    own predictions is taken at the unit's output."""
    fp_model = reference if reference is not None else model
    store = torch.device(store)
    seen: dict[str, list[torch.Tensor]] = {"q_in": [], "fp_in": [], "fp_out": [], "fisher": []}
    mode: dict[str, bool] = {}
    leaf: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(store, dtype)

    def hook(mod, args, output):
        if mode["quant"]:
            seen["q_in"].append(keep(args[0]))
            raise _Stop
        if fp_inputs:
            seen["fp_in"].append(keep(args[0]))
        seen["fp_out"].append(keep(output))
        if not fisher:
            raise _Stop
        leaf.append(output.detach().requires_grad_())
        return leaf[-1]  # the rest of the network runs from a leaf whose gradient is the one wanted

    states = {m: m.enabled for m in model.modules() if isinstance(m, (ActQuantizer, WeightQuantizer))}
    modules = {unit.module(model), unit.module(fp_model)}
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        for x in batches:
            for quant in (False, True):
                mode["quant"] = quant
                if fp_model is model:
                    for m, enabled in states.items():
                        m.enabled = enabled and quant
                net = model if quant else fp_model
                try:
                    if fisher and not quant:
                        with torch.enable_grad():
                            logits = net(x)
                            F.cross_entropy(logits, logits.argmax(1), reduction="sum").backward(inputs=leaf[-1:])
                        seen["fisher"].append(keep(leaf.pop().grad.square()))
                    else:
                        net(x)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        for m, enabled in states.items():
            m.enabled = enabled
    weights = None
    if fisher:
        weights = torch.cat(seen["fisher"])
        weights.div_(weights.float().mean().clamp(min=1e-30).to(weights.dtype))
    pinned = store.type == "cpu" and torch.cuda.is_available() and next(model.parameters()).is_cuda
    cat = (lambda ts: torch.cat(ts).pin_memory()) if pinned else torch.cat
    return UnitData(
        cat(seen["q_in"]), cat(seen["fp_in"]) if fp_inputs else None, cat(seen["fp_out"]),
        weights.pin_memory() if pinned and weights is not None else weights,
    )  # fmt: skip
