"""Bit packing of integer codes: b-bit values (2 ≤ b ≤ 8) laid end to end in a little-endian bit stream of bytes.

Four 2-bit, two 4-bit or one 8-bit value per byte; 3-, 5-, 6- and 7-bit codes straddle byte boundaries, so every
width costs exactly ceil(n·b / 8) bytes. Vectorised: no Python loop over values.
"""

from __future__ import annotations

import torch


def packed_size(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (values < 2^bits, any shape) → 1-D uint8 tensor of `packed_size(numel, bits)` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    n = flat.numel()
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)  # LSB first, value after value
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    stream = stream.reshape(-1, 8)
    out = torch.zeros(stream.shape[0], dtype=torch.uint8, device=flat.device)
    for j in range(8):
        out |= stream[:, j] << j
    assert out.numel() == packed_size(n, bits)
    return out


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack`: the first `numel` b-bit codes as a 1-D uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    packed = packed.reshape(-1).to(torch.uint8)
    if packed.numel() != packed_size(numel, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold {numel} {bits}-bit codes")
    if bits == 8:
        return packed.clone()
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[: numel * bits].reshape(numel, bits)
    out = torch.zeros(numel, dtype=torch.uint8, device=packed.device)
    for k in range(bits):
        out |= stream[:, k] << k
    return out
