"""The synthesis loop: one batch of calibration images from a pretrained model's own BatchNorm statistics.

Images live in the model's normalised input space and start from N(0, 1) (or come from Genie's generator). Adam
(lr 0.5 on pixels) minimises the method's weighted sum of losses (`ptq.synth.losses`); the LR drops ×0.1 on a
plateau down to 1e-4. A window whose mean loss exceeds `divergence` × the best window's so far (Adam at lr 0.5 on
pixels can blow up, e.g. on small 28² inputs) restores the parameters and optimizer state of the best window and
divides the LR by 10. Everything random in a batch comes from generators seeded by (seed, batch index), so a batch
is the same whichever order or process makes it. The loss is read back from the device once per plateau window, not
every iteration.

IntraQ's class centres are the one state shared between batches: a batch uses the centres it is given
(`set_centres`) and returns its own contribution (per-class feature sums and counts) without adding it, so that the
caller decides which batches see which (`ptq.synth.run`: rounds, possibly made by several processes).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptq.config import SynthConfig, SynthMethod
from ptq.errors import PtqError
from ptq.synth.augment import random_resized_crop
from ptq.synth.generator import Generator, swing_convolutions
from ptq.synth.losses import (
    bns_loss,
    distorted_targets,
    input_stats_loss,
    marginal_distance_loss,
    soft_inception_loss,
)
from ptq.synth.stats import BNStatistics, FeatureTap

log = logging.getLogger(__name__)
BN_METHODS = ", ".join(m.value for m in SynthMethod)


class SynthError(PtqError, RuntimeError):
    """Synthesis cannot run as asked; the message says why and what to do instead."""


@dataclass
class SynthBatch:
    images: torch.Tensor  # (N, C, H, W) on the CPU, normalised input space
    labels: torch.Tensor  # (N,) int64
    losses: dict[str, float]  # final value of each loss term and of the total
    centres: dict[str, torch.Tensor]  # this batch's class-centre contribution (feature sums, counts), on the CPU


@dataclass
class ClassStatistics:
    """Per-class BN input statistics measured on real images (FDDA's "BNS centres"), deep BN layers concatenated."""

    classes: list[int]
    means: dict[int, torch.Tensor]
    variances: dict[int, torch.Tensor]


@contextmanager
def frozen(model: nn.Module):
    """Gradients w.r.t. the input only: the teacher's parameters stop requiring grad for the duration."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def batch_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 17) % (2**63 - 1)


class Synthesizer:
    def __init__(
        self,
        model: nn.Module,
        input_size: tuple[int, int, int],
        config: SynthConfig,
        device: torch.device | str = "cpu",
        class_stats: ClassStatistics | None = None,
    ):
        self.model, self.config, self.device = model.eval(), config, torch.device(device)
        self.input_size = tuple(input_size)
        self.stats = BNStatistics(model, per_sample=config.per_sample_stats)
        if len(self.stats) == 0:
            raise SynthError(
                f"{type(model).__name__} has no BatchNorm layers, which methods {BN_METHODS} need; "
                "calibrate on real images with --calib-data DIR instead"
            )
        self.target_mean, self.target_var = self.stats.running()
        self.weights = self.stats.layer_weights().to(self.device)
        deep = self.stats.deep_start()
        self.deep_offset = self.stats.offsets[deep]
        self.deep_weights = self.stats.layer_weights(deep).to(self.device)
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        if self.num_classes < 1:
            raise SynthError("the model has no classification head (num_classes); zero-shot synthesis needs one")
        self.classes = torch.tensor(config.classes if config.classes else range(self.num_classes), device=self.device)
        if int(self.classes.max()) >= self.num_classes or int(self.classes.min()) < 0:
            raise SynthError(f"--classes must lie in 0..{self.num_classes - 1}")
        if config.method is SynthMethod.FDDA and class_stats is None:
            raise SynthError("fdda needs a few real images (one per class is enough): pass --calib-data DIR")
        self.class_stats = class_stats
        self.tap = FeatureTap(model) if config.w_mdc > 0 else None
        dim = int(getattr(model, "num_features", 0) or 1)
        self.centre_sums = torch.zeros(self.num_classes, dim, device=self.device)
        self.centre_counts = torch.zeros(self.num_classes, device=self.device)

    # -- IntraQ's class centres: per-class sums and counts of the features of the batches this one may see --
    @property
    def centred(self) -> bool:
        """Whether batches depend on the centres (the marginal distance constraint is on)."""
        return self.tap is not None

    def empty_centres(self) -> dict[str, torch.Tensor]:
        return {
            "centre_sums": torch.zeros_like(self.centre_sums).cpu(),
            "centre_counts": torch.zeros_like(self.centre_counts).cpu(),
        }

    def set_centres(self, centres: dict[str, torch.Tensor]) -> None:
        self.centre_sums = centres["centre_sums"].to(self.device, torch.float32)
        self.centre_counts = centres["centre_counts"].to(self.device, torch.float32)

    def _labels(self, index: int, size: int, g: torch.Generator) -> torch.Tensor:
        if self.config.method is SynthMethod.FDDA:  # class-pure batches over the classes seen in the real set
            c = self.class_stats.classes[index % len(self.class_stats.classes)]
            return torch.full((size,), c, dtype=torch.long, device=self.device)
        pick = torch.randint(len(self.classes), (size,), generator=g, device=self.device)
        return self.classes[pick]

    def _loss(self, x: torch.Tensor, labels: torch.Tensor, label: int | None, g: torch.Generator) -> dict:
        cfg = self.config
        with ExitStack() as stack:
            stack.enter_context(self.stats)
            if self.tap is not None:
                stack.enter_context(self.tap)
            logits = self.model(x)
        mean, var = self.stats.moments()
        parts: dict[str, torch.Tensor] = {}
        if cfg.w_bns:
            parts["bns"] = cfg.w_bns * bns_loss(mean, var, self.target_mean, self.target_var, self.weights, cfg.use_std)
        if cfg.w_input:
            parts["input"] = cfg.w_input * input_stats_loss(x)
        if cfg.w_sil:
            parts["sil"] = cfg.w_sil * soft_inception_loss(logits, labels, cfg.sil_epsilon, g)
        if cfg.w_mdc:
            centres = self.centre_sums / self.centre_counts.clamp_min(1).unsqueeze(1)
            parts["mdc"] = cfg.w_mdc * marginal_distance_loss(
                self.tap.features, labels, centres, self.centre_counts > 0, cfg.mdc_lower, cfg.mdc_upper
            )
        if cfg.w_ce:
            parts["ce"] = cfg.w_ce * F.cross_entropy(logits.float(), labels)
        if cfg.method is SynthMethod.FDDA:
            cm, cv = self.class_stats.means[label], self.class_stats.variances[label]
            dm, dv = distorted_targets(cm, cv, cfg.fdda_mean_std, cfg.fdda_var_std, g)
            deep_m, deep_v, w = mean[..., self.deep_offset :], var[..., self.deep_offset :], self.deep_weights
            parts["fdda_central"] = cfg.w_fdda_central * bns_loss(deep_m, deep_v, cm, cv, w, cfg.use_std)
            parts["fdda_distorted"] = cfg.w_fdda_distorted * bns_loss(deep_m, deep_v, dm, dv, w, cfg.use_std)
        parts["total"] = sum(parts.values())
        return parts

    def batch(self, index: int, size: int, step: Callable[[int], None] | None = None) -> SynthBatch:
        """Synthesize batch `index` of `size` images (deterministic in (seed, index))."""
        cfg = self.config
        seed = batch_seed(cfg.seed, index)
        g = torch.Generator(device=self.device).manual_seed(seed)
        host = random.Random(seed)  # control decisions drawn on the host: no device sync
        cpu_g = torch.Generator().manual_seed(seed)
        labels = self._labels(index, size, g)
        label = int(labels[0]) if cfg.method is SynthMethod.FDDA else None
        generator = None
        if cfg.method is SynthMethod.GENIE:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                generator = Generator(self.input_size[1:], self.input_size[0], cfg.latent_dim).to(self.device)
            latents = torch.randn(size, cfg.latent_dim, generator=g, device=self.device).requires_grad_()
            opt = torch.optim.Adam(
                [{"params": [latents], "lr": cfg.latent_lr}, {"params": generator.parameters(), "lr": cfg.generator_lr}]
            )
        else:
            pixels = torch.randn(size, *self.input_size, generator=g, device=self.device).requires_grad_()
            opt = torch.optim.Adam([pixels], lr=cfg.lr)
        windows_patience = max(1, cfg.plateau_patience // cfg.plateau_window)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=windows_patience, min_lr=cfg.min_lr)
        window_sum = torch.zeros((), device=self.device)
        best = _Best(opt)
        with ExitStack() as stack:
            stack.enter_context(frozen(self.model))
            if cfg.swing:
                stack.enter_context(swing_convolutions(self.model, cpu_g))
            for it in range(cfg.iters):
                opt.zero_grad(set_to_none=True)
                x = generator(latents) if generator is not None else pixels
                if cfg.lor_prob and host.random() < cfg.lor_prob:
                    x = random_resized_crop(x, cfg.crop_min_scale, g)
                parts = self._loss(x, labels, label, g)
                parts["total"].backward()
                opt.step()
                window_sum += parts["total"].detach()
                if (it + 1) % cfg.plateau_window == 0:
                    loss = float(window_sum) / cfg.plateau_window
                    window_sum.zero_()
                    if cfg.divergence and loss > cfg.divergence * best.loss:
                        best.restore(factor=sched.factor, min_lr=cfg.min_lr)  # the plateau schedule's cut
                        log.warning(
                            "synthesis batch %d: the loss diverged at iteration %d (%.4g, best %.4g); went back to the "
                            "best state at a %g× lower LR — if this recurs, lower synth.lr (--set synth.lr=0.1)",
                            index, it + 1, loss, best.loss, 1 / sched.factor,
                        )  # fmt: skip
                    else:
                        best.keep(loss)
                        sched.step(loss)
                if step is not None:
                    step(it + 1)
        with torch.no_grad():
            images = generator(latents) if generator is not None else pixels.detach()
            sums, counts = torch.zeros_like(self.centre_sums), torch.zeros_like(self.centre_counts)
            with ExitStack() as stack:
                if self.tap is not None:
                    stack.enter_context(self.tap)
                final = self._loss(images, labels, label, g)
                if self.tap is not None:
                    sums.index_add_(0, labels, self.tap.features.float())
                    counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float))
        centres = {"centre_sums": sums.cpu(), "centre_counts": counts.cpu()}
        return SynthBatch(images.detach().cpu(), labels.cpu(), {k: float(v) for k, v in final.items()}, centres)


class _Best:
    """The parameters and Adam state of the lowest-loss window so far, to fall back on when the loss diverges."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt, self.loss, self.saved = opt, float("inf"), None

    def keep(self, loss: float) -> None:
        if loss < self.loss:
            self.loss = loss
            params = [p for group in self.opt.param_groups for p in group["params"]]
            self.saved = [(p, p.detach().clone(), {k: v.clone() for k, v in self.opt.state[p].items()}) for p in params]

    @torch.no_grad()
    def restore(self, factor: float, min_lr: float) -> None:
        for p, value, state in self.saved:
            p.copy_(value)
            for k, v in state.items():
                self.opt.state[p][k].copy_(v)
        for group in self.opt.param_groups:
            group["lr"] = max(group["lr"] * factor, min_lr)


@torch.no_grad()
def class_statistics(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None) -> ClassStatistics:
    """Per-class BN input statistics of real images on the deep half of the BN layers (FDDA).

    Unlabelled images take the model's own prediction as their class. Per-image statistics are combined exactly:
    μ_c = mean of image means, σ²_c = mean of (image variance + image mean²) − μ_c².
    """
    stats = BNStatistics(model, per_sample=True)
    if len(stats) == 0:
        raise SynthError(f"the model has no BatchNorm layers, which methods {BN_METHODS} need")
    with stats:
        logits = model(images)
    labels = logits.argmax(1) if labels is None else labels
    mean, var = stats.moments()  # (N, ΣC): per image
    start = stats.offsets[stats.deep_start()]
    mean, var = mean[:, start:], var[:, start:]
    result = ClassStatistics(sorted(set(labels.tolist())), {}, {})
    for c in result.classes:
        m, v = mean[labels == c], var[labels == c]
        result.means[c] = m.mean(0)
        result.variances[c] = (v + m.pow(2)).mean(0) - result.means[c].pow(2)
    return result
