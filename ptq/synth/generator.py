"""Genie's generator path (arXiv 2212.04780): a small generator plus learnable per-image latents, and swing conv.

Generator: Linear → BN → ×2 upsample → conv → BN → LeakyReLU → ×2 upsample → conv → BN → LeakyReLU → conv → tanh →
BN(affine=False), mapping latents z (dim 256) to images in the model's normalised input space.
Swing convolution: while synthesizing, the input of every stride-2 conv of the teacher is reflect-padded by 1 px and
cropped back at a random offset of 0–2 px, which removes checkerboard artefacts. Only during synthesis.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class Generator(nn.Module):
    def __init__(self, image_size: tuple[int, int], channels: int = 3, latent_dim: int = 256, width: int = 64):
        super().__init__()
        self.init_size = (max(1, image_size[0] // 4), max(1, image_size[1] // 4))
        self.image_size = image_size
        self.width = width
        self.fc = nn.Linear(latent_dim, 2 * width * self.init_size[0] * self.init_size[1])
        self.bn0 = nn.BatchNorm2d(2 * width)
        self.conv1 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.conv2 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.fc(z).view(z.shape[0], 2 * self.width, *self.init_size))
        x = F.interpolate(x, scale_factor=2)
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
        x = F.interpolate(x, scale_factor=2)
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        x = torch.tanh(self.conv3(x))
        if tuple(x.shape[-2:]) != tuple(self.image_size):
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return self.out_bn(x)


@contextmanager
def swing_convolutions(model: nn.Module, generator: torch.Generator | None = None):
    """Randomly shift (0–2 px after 1 px reflect padding) the input of every stride-2 conv while the block runs."""

    def hook(module, args):
        x = args[0]
        h, w = x.shape[-2:]
        dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return (padded[..., dy : dy + h, dx : dx + w], *args[1:])

    handles = [
        m.register_forward_pre_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and max(m.stride) == 2 and m.kernel_size != (1, 1)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
