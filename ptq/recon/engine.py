"""One reconstruction engine for layers and blocks (AdaRound arXiv 2004.10568, BRECQ 2102.05426, QDrop 2203.05740,
Genie-M 2212.04780); the methods differ only in `Settings`.

For a unit of a prepared, calibrated model: its inputs come from the already-quantized model, its targets from an
FP copy of the model taken before reconstruction began (the BN-folded FP network: the model's own layers hold
rounded weights once their unit is done), both collected for the calibration images one unit at a time. The
unit's weight quantizers are replaced by AdaRound quantizers and trained with Adam to minimise

    L = Σ_c w·(ẑ − z)² averaged over (N, H, W)  +  λ · Σ (1 − |2h(V) − 1|^β)     (β: 20 → 2 after a 20% warm-up)

where w = 1, or with Fisher weighting the squared gradient of the task loss at the unit's output (normalised to mean
1). Learned alongside, by setting:
- activation step sizes inside the unit (LSQ): jointly with V (QDrop, cosine-annealed lr), or in a second pass once
  the rounding is fixed (BRECQ, loss Σ_c |ẑ − z|^p with p = 2.4, activations off during the first pass);
- the per-channel weight scales (Genie-M, cosine-annealed lr, ⌊W/s₀⌋ frozen).
With QDrop (keep probability p < 1), every activation quantizer inside the unit and the unit's input keep their
quantized value element-wise with probability p, else pass the FP value. At the end rounding is made hard and the
result becomes the layers' weights, exactly on their quantizers' grids.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ptq import distributed
from ptq._fuse import fused
from ptq.config import ActSteps
from ptq.quant.functional import _as_weights, keep_mask, mix
from ptq.quant.modules import ActQuantizer, QuantLayer, WeightQuantizer, set_quant_state
from ptq.recon.adaround import AdaRoundQuantizer, beta_at
from ptq.recon.units import Unit

log = logging.getLogger(__name__)

CHECK_EVERY = 50  # iterations between finiteness checks of the loss
Step = Callable[[int, float], None]  # (iterations done in this pass, reconstruction loss)


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the unit has run."""


@dataclass
class Settings:
    """What one unit learns, and how; `ptq.recon.run` derives it from the method and `ReconConfig`."""

    iters: int = 20000
    batch_size: int = 32
    lr: float = 1e-3
    reg_weight: float = 0.01
    keep_prob: float = 1.0
    act_steps: ActSteps = ActSteps.FIXED
    act_lr: float = 4e-5
    act_iters: int = 5000  # second pass only
    act_loss_p: float = 2.4  # second pass only
    weight_scale_lr: float | None = None  # Genie-M when set
    act_search: bool = False  # start activation steps from a search on the unit's output error
    seed: int = 0


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


@fused
def _gather_mix(fp, quantized, idx, keep):
    """QDrop's input for rows `idx` of the (rows, elements) caches: lerp(FP, quantized, keep) in float32."""
    return torch.lerp(fp[idx].float(), quantized[idx].float(), keep.to(torch.float32))


@fused
def _squared_error(out, targets, idx, weights):
    """Σ w·(out − targets[idx])² over flat (rows, elements) tensors, in one pass."""
    err = (out - targets[idx].float()).square()
    return (err if weights is None else err * weights[idx].float()).sum()


@fused
def _squared_error_and_grad(out, targets, idx, weights, norm):
    """`norm`·Σ w·(out − targets[idx])² and its gradient 2·norm·w·(out − targets[idx]), in one pass."""
    diff = out - targets[idx].float()
    weighted = diff if weights is None else diff * weights[idx].float()
    return (weighted * diff).sum() * norm, weighted * (2 * norm)


class _SquaredError(torch.autograd.Function):
    """`reconstruction_loss` in one pass: the targets (and weights) are read at rows `idx` straight from the
    cache, and where a backward will follow the forward writes the gradient at once instead of the backward
    reading the output and the targets again."""

    @staticmethod
    def forward(ctx, out, targets, weights, idx):
        if not out.numel():
            ctx.save_for_backward(torch.zeros_like(out))
            return out.new_zeros(())
        flat = [None if t is None else t.reshape(t.shape[0], -1) for t in (out, targets, weights)]
        norm = (out.shape[1] if out.ndim > 1 else 1) / out.numel()  # Σ over channels, mean over the rest
        if not ctx.needs_input_grad[0]:
            return _squared_error(flat[0], flat[1], idx, flat[2]) * norm
        loss, grad = _squared_error_and_grad(flat[0], flat[1], idx, flat[2], out.new_full((), norm))
        ctx.save_for_backward(grad.view(out.shape))
        return loss

    @staticmethod
    def backward(ctx, grad):
        (d_out,) = ctx.saved_tensors
        if grad.device.type == "cpu" and float(grad) == 1.0:  # the usual case, told apart for free on the host
            return d_out, None, None, None
        return d_out * grad, None, None, None


def reconstruction_loss(
    out: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None, idx: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ over channels of the (optionally weighted) squared error, averaged over the other dimensions; the targets
    and weights are the rows `idx` of those given (all of them when `idx` is None)."""
    if idx is None:
        idx = torch.arange(out.shape[0], device=out.device)
    return _SquaredError.apply(out, targets, weights, idx)


def lp_loss(out: torch.Tensor, targets: torch.Tensor, p: float, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over channels of |ẑ − z|^p, averaged over the other dimensions (BRECQ's activation pass)."""
    err = (out - (targets if idx is None else targets[idx].float())).abs().pow(p)
    return err.sum(dim=1).mean() if err.ndim > 1 else err.mean()


@torch.no_grad()
def unit_error(model: nn.Module, unit: Unit, data: UnitData, batch: int = 64) -> float:
    """The unit's reconstruction loss over the whole calibration set (over every rank's share under torchrun)."""
    module = unit.module(model)
    device = next(module.parameters()).device
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(data), batch):
        idx = torch.arange(i, min(i + batch, len(data)), device=data.q_inputs.device)
        x = data.inputs(idx, device)
        total[0] += float(reconstruction_loss(module(x), *data.targets_for(idx, device))) * x.shape[0]
    total[1] = len(data)
    distributed.all_reduce_([total])
    return float(total[0] / total[1]) if total[1] else 0.0


def _rows(n: int) -> tuple[int, int]:
    """(rows over all ranks, this rank's first row): each rank caches a contiguous share of the calibration set."""
    counts = distributed.gather_objects(n)
    return sum(counts), sum(counts[: distributed.world().rank])


def _cosine(iters: int) -> Callable[[int], float]:
    return lambda it: 0.5 * (1 + math.cos(math.pi * min(it, iters) / max(iters, 1)))


def _optimise(
    module: nn.Module,
    data: UnitData,
    groups: list[dict],
    iters: int,
    settings: Settings,
    loss_fn: Callable[..., torch.Tensor],
    penalty: Callable[[int], torch.Tensor] | None,
    seed: int,
    step: Step | None,
    begin: Callable[[int], None] | None = None,
) -> bool:
    """Adam over `groups` (a group with `cosine: True` has its lr annealed to 0) for `iters` iterations on random
    mini-batches of `data`, minimising loss_fn(output, *data.targets_for(...)) + penalty(iteration), with
    begin(iteration) called before each iteration's forward. A non-finite loss ends
    the pass with every parameter at its last good value; returns whether that happened.

    Mini-batches are drawn from the whole calibration set with one seeded generator. Under torchrun every rank
    draws the same indices, runs the rows it holds, weights its loss by its share of the batch and adds 1/world of
    the penalty; gradients are summed over ranks before each step, so every rank takes the step one process would
    take on the same batch (QDrop's random masks excepted: each rank draws its own)."""
    device = next(module.parameters()).device
    params = [p for g in groups for p in g["params"]]
    cosine = [g.pop("cosine", False) for g in groups]
    opt = torch.optim.Adam(groups, fused=device.type in ("cpu", "cuda"))  # one kernel per step, not ~8 passes
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [_cosine(iters) if c else (lambda it: 1.0) for c in cosine])
    w = distributed.world()
    n = len(data)
    rows, first = _rows(n)
    batch = min(settings.batch_size, rows)
    draws = torch.randint(rows, (iters, batch), generator=torch.Generator().manual_seed(seed))
    if not w.distributed:
        draws = draws.to(data.q_inputs.device)  # one copy; the loop only slices it
    good = [p.detach().clone() for p in params]
    devices = [device.index or 0] if device.type == "cuda" else []
    keep_prob = settings.keep_prob
    with torch.random.fork_rng(devices=devices):  # QDrop's masks: reproducible per unit, e.g. on resume
        torch.manual_seed(seed + 7_919 * w.rank)
        for it in range(iters):
            idx, share = draws[it], 1.0
            if w.distributed:  # the batch's rows that this rank holds
                idx = idx[(idx >= first) & (idx < first + n)] - first
                idx, share = idx.to(data.q_inputs.device), idx.numel() / batch
            if begin is not None:
                begin(it)
            rec = torch.zeros((), device=device)
            if idx.numel():
                rec = loss_fn(module(data.inputs(idx, device, keep_prob)), *data.targets_for(idx, device)) * share
            loss = rec if penalty is None else rec + penalty(it) / w.size
            if (it + 1) % CHECK_EVERY == 0 or it + 1 == iters or it == 0:  # one host sync per check
                both = torch.stack([loss.detach(), rec.detach()]).double().cpu()
                distributed.all_reduce_([both])
                if not torch.isfinite(both[0]):
                    with torch.no_grad():
                        for p, v in zip(params, good, strict=True):
                            p.copy_(v)
                    return True
                good = [p.detach().clone() for p in params]
                if step is not None:
                    step(it + 1, float(both[1]))
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
            if w.distributed:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                distributed.all_reduce_([p.grad for p in params])
            opt.step()
            sched.step()
    return False


def reconstruct_unit(
    model: nn.Module,
    unit: Unit,
    data: UnitData,
    settings: Settings | None = None,
    step: Step | None = None,
    start: dict[str, torch.Tensor] | None = None,
    **kw,
) -> dict[str, float]:
    """Reconstruct one unit in place (see the module docstring); `kw` overrides fields of `settings`. `start` maps
    layer names to the weights their rounding starts from (default: the layer's own weight): AdaRound decides
    between the two grid points around it, and before any iteration its hard rounding is to the nearest.

    Afterwards its layers' weights are hard-rounded on their quantizers' grids (whose scales Genie-M may have
    changed) and its activation quantizers hold their learned steps."""
    settings = replace(settings or Settings(), **kw)
    module = unit.module(model)
    device = next(module.parameters()).device
    layers: list[QuantLayer] = [model.get_submodule(name) for name in unit.layers]
    learn_scale = settings.weight_scale_lr is not None
    start = start or {}
    rounders = [
        AdaRoundQuantizer(start.get(name, layer.weight), layer.weight_quantizer.scale,
                          layer.weight_quantizer.zero_point, layer.weight_quantizer.bits, learn_scale).to(device)
        for name, layer in zip(unit.layers, layers, strict=True)
    ]  # fmt: skip
    originals = [layer.weight_quantizer for layer in layers]
    inner = [m for m in module.modules() if isinstance(m, ActQuantizer) and m.enabled]
    if settings.act_search and inner:
        search_act_steps(module, data, inner)
    second_pass = settings.act_steps is ActSteps.SECOND_PASS and bool(inner)
    iters = settings.iters

    def set_beta(it):  # before an iteration's forward, which computes the regulariser alongside the soft weights
        for r in rounders:
            r.beta, r.penalty = beta_at(it, iters), None

    def rounding_penalty(it):
        beta = beta_at(it, iters)
        if beta is None:
            return torch.zeros((), device=device)
        # a rank that held none of the batch's rows ran no forward: its regulariser is computed on its own
        return settings.reg_weight * sum(r.regulariser(beta) if r.penalty is None else r.penalty for r in rounders)

    diverged = False
    frozen = {p: p.requires_grad for p in module.parameters()}  # only the parts named below learn
    try:
        for p in frozen:
            p.requires_grad_(False)
        for layer, rounder in zip(layers, rounders, strict=True):
            layer.weight_quantizer = rounder
            rounder.enabled = True  # QuantLayer only calls a quantizer that is enabled
        for q in inner:
            q.keep_prob = settings.keep_prob
            q.enabled = not second_pass  # BRECQ: the rounding is learned with the unit's activations in FP
        groups = [{"params": [r.v for r in rounders], "lr": settings.lr}]
        if learn_scale:
            groups.append({"params": [r.scale for r in rounders], "lr": settings.weight_scale_lr, "cosine": True})
        if settings.act_steps is ActSteps.JOINT and inner:
            groups.append({"params": [q.learn_scale() for q in inner], "lr": settings.act_lr, "cosine": True})
        diverged = _optimise(
            module, data, groups, iters, settings, reconstruction_loss, rounding_penalty, settings.seed, step, set_beta
        )
        for rounder in rounders:
            rounder.hard, rounder.beta, rounder.penalty = True, None, None
        if second_pass and not diverged:
            for q in inner:
                q.enabled = True
            steps = [q.learn_scale() for q in inner]

            def act_loss(out, targets, weights, idx):
                return lp_loss(out, targets, settings.act_loss_p, idx)

            def act_step(it, rec):
                if step is not None:
                    step(iters + it, rec)

            groups = [{"params": steps, "lr": settings.act_lr}]
            diverged = _optimise(
                module, data, groups, settings.act_iters, settings, act_loss, None, settings.seed + 1, act_step
            )
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        for q in inner:
            q.keep_prob = None
            q.enabled = True
            if q.scale.requires_grad:
                q.learn_scale(False)
        with torch.no_grad():
            for layer, rounder, original in zip(layers, rounders, originals, strict=True):
                layer.layer.weight.copy_(rounder.hard_weight())
                if learn_scale:
                    original.scale.copy_(rounder.channel_scale().to(original.scale))
                layer.weight_quantizer = original
    if diverged:
        log.warning("unit %s: loss became NaN/inf; kept its last good state and went on", unit.name)
    return {"reconstruction_error": unit_error(model, unit, data), "diverged": diverged}


SEARCH_FACTORS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.35, 1.5)
SEARCH_ROWS = 128


@torch.no_grad()
def search_act_steps(module: nn.Module, data: UnitData, quantizers: list[ActQuantizer]) -> list[float]:
    """Each activation step of the unit, in turn, scaled by the factor of `SEARCH_FACTORS` that gives the lowest
    reconstruction loss of the unit's output (quantized weights, every quantizer on) on up to `SEARCH_ROWS` of
    its cached images: the step that is best for the output rather than for the activation's own Lp error. Under
    torchrun the losses are summed over ranks, so every rank picks the same factor. Returns the factors."""
    device = next(module.parameters()).device
    idx = torch.arange(min(len(data), SEARCH_ROWS), device=data.q_inputs.device)
    x = data.inputs(idx, device)
    targets = data.targets_for(idx, device)
    chosen = []
    for q in quantizers:
        base = q.scale.detach().clone()
        losses = torch.zeros(len(SEARCH_FACTORS), dtype=torch.float64)
        for i, factor in enumerate(SEARCH_FACTORS):
            q.scale.copy_(base * factor)
            losses[i] = float(reconstruction_loss(module(x), *targets)) * len(idx) if len(idx) else 0.0
        distributed.all_reduce_([losses])
        best = SEARCH_FACTORS[int(torch.argmin(losses))]
        q.scale.copy_(base * best)
        chosen.append(best)
    return chosen


def total_iters(settings: Settings, unit: Unit, model: nn.Module) -> int:
    """Iterations `reconstruct_unit` runs on `unit` (for progress): the rounding pass, plus BRECQ's activation pass."""
    module = unit.module(model)
    has_acts = any(isinstance(m, ActQuantizer) and m.enabled for m in module.modules())
    return settings.iters + (settings.act_iters if settings.act_steps is ActSteps.SECOND_PASS and has_acts else 0)
