"""Local Object Reinforcement (IntraQ arXiv 2111.09136): a differentiable random-resized-crop + flip of a whole batch.

Each image gets its own crop (area fraction s ~ U(η, 1), aspect ratio log-uniform in [3/4, 4/3], random position)
and a horizontal flip with probability 0.5, resampled back to full size — all in one `affine_grid` + `grid_sample`
call for the batch, so gradients flow to the pixels and there is no Python loop over images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_resized_crop(
    x: torch.Tensor, min_scale: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    n, device = x.shape[0], x.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=device)

    area = min_scale + (1 - min_scale) * rand(n)
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand(n)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width and height as fractions of the image
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1 - w) * (2 * rand(n) - 1)  # centre in normalised [-1, 1] coordinates, crop kept inside the image
    cy = (1 - h) * (2 * rand(n) - 1)
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device, dtype=x.dtype)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
