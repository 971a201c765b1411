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

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from ptq import distributed
from ptq.config import ActSteps
from ptq.quant.modules import ActQuantizer, QuantLayer
from ptq.recon.adaround import AdaRoundQuantizer, beta_at
from ptq.recon.cache import UnitData, collect, fp_reference  # noqa: F401 (collect, fp_reference: re-exported)
from ptq.recon.losses import lp_loss, reconstruction_loss
from ptq.recon.units import Unit

log = logging.getLogger(__name__)

CHECK_EVERY = 50  # iterations between finiteness checks of the loss
Step = Callable[[int, float], None]  # (iterations done in this pass, reconstruction loss)


@dataclass
class Settings:
    """What one unit learns, and how; `ptq.recon.run.settings_for` derives it from the method's published defaults
    (`ptq.config.RECON_PRESETS`) and `ReconConfig`. The defaults here are AdaRound's."""

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
