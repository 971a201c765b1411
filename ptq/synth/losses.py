"""Synthesis losses as small composable functions. A method preset weights and sums them.

- BNS (ZeroQ / GDFQ): L = (1/L) Σ_l [ MSE(μ̂_l, μ_l) + MSE(σ̂²_l, σ²_l) ], optionally on σ = √(σ² + 1e-6).
- Input statistics: each image's per-channel mean/std pulled towards 0/1 (the normalised input space).
- Soft Inception Loss (IntraQ arXiv 2111.09136): L = mean((p_{i,y} − t_i)²), t_i ~ U(ε, 1) w.p. 0.5, else 1.
- Marginal Distance Constraint (IntraQ): D = 1 − cos(f_i, c_y); L = mean(relu(λ_l − D) + relu(D − λ_u)).
- FDDA (arXiv 2109.04186): BNS-centralized and BNS-distorted losses on the deep half of the BN layers, against
  per-class statistics measured on real images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STD_EPS = 1e-6


def _spread(var: torch.Tensor, use_std: bool) -> torch.Tensor:
    return torch.sqrt(var + STD_EPS) if use_std else var


def bns_loss(
    mean: torch.Tensor,
    var: torch.Tensor,
    target_mean: torch.Tensor,
    target_var: torch.Tensor,
    weights: torch.Tensor,
    use_std: bool = False,
) -> torch.Tensor:
    """(1/L) Σ_l [MSE(μ̂_l, μ_l) + MSE(σ̂²_l, σ²_l)] on layers concatenated along the last dimension.

    `weights` holds 1/(C_l·L) for every channel of layer l, so one weighted sum is the mean of per-layer MSEs;
    per-sample statistics (N, ΣC) are averaged over the images as well.
    """
    error = (mean - target_mean).square() + (_spread(var, use_std) - _spread(target_var, use_std)).square()
    return (error * weights).sum(-1).mean()


def input_stats_loss(x: torch.Tensor) -> torch.Tensor:
    """Each image's per-channel mean towards 0 and standard deviation towards 1."""
    std, mean = torch.std_mean(x, dim=(2, 3))
    return F.mse_loss(mean, torch.zeros_like(mean)) + F.mse_loss(std, torch.ones_like(std))


def soft_inception_loss(
    logits: torch.Tensor, labels: torch.Tensor, epsilon: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(p_{i,y} − t_i)² with soft targets t_i ~ U(ε, 1) for a random half of the batch, 1 for the rest."""
    p = logits.float().softmax(dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    n, device = labels.numel(), logits.device
    soft = torch.rand(n, generator=generator, device=device) < 0.5
    uniform = epsilon + (1 - epsilon) * torch.rand(n, generator=generator, device=device)
    return F.mse_loss(p, torch.where(soft, uniform, torch.ones_like(uniform)))


def marginal_distance_loss(
    features: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, valid: torch.Tensor, lower: float, upper: float
) -> torch.Tensor:
    """Keep 1 − cos(f_i, c_{y_i}) within [λ_l, λ_u] for images whose class already has a centre (`valid[y]`).

    A masked mean, no boolean indexing: nothing waits for the device (0 while no image's class has a centre).
    """
    mask = valid[labels].float()
    distance = 1 - F.cosine_similarity(features.float(), centres[labels], dim=1)
    penalty = F.relu(lower - distance) + F.relu(distance - upper)
    return (penalty * mask).sum() / mask.sum().clamp_min(1)


def distorted_targets(
    mean: torch.Tensor, var: torch.Tensor, mean_std: float, var_std: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FDDA's BNS-distorted targets μ_c + N(0, a²), σ²_c + N(0, b²) (variance kept ≥ 0), re-drawn on every call."""
    noise = torch.randn((2, *mean.shape), generator=generator, device=mean.device)
    return mean + mean_std * noise[0], (var + var_std * noise[1]).clamp_min(0)
