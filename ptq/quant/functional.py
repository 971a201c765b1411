"""Uniform affine quantization as pure, vectorised functions.

A tensor x is quantized with a step `scale` s and an integer `zero_point` z onto the unsigned grid {0, ..., 2^b - 1}:

    q = clamp(round(x / s) + z, 0, 2^b - 1),     x̂ = (q - z) · s

Symmetric quantization is the special case z = 2^(b-1) (the grid is centred on zero), so both kinds share one
integer code range and one packing format. `scale` and `zero_point` broadcast against x: a scalar for per-tensor,
shape (C, 1, 1, 1) / (C, 1) for per-output-channel weights.
"""

from __future__ import annotations

import math

import torch

from ptq._fuse import fused


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient (d round(x)/dx := 1)."""
    return (x.round() - x).detach() + x


def qrange(bits: int) -> tuple[int, int]:
    """The unsigned integer code range for `bits`."""
    return 0, 2**bits - 1


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """x̂ = (clamp(round(x/s) + z, 0, 2^b-1) - z) · s, differentiable in x (STE) and in s (LSQ-style)."""
    qmin, qmax = qrange(bits)
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes q = clamp(round(x/s) + z, 0, 2^b-1) as uint8 (b ≤ 8)."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.uint8)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """x̂ = (q - z) · s in the dtype of `scale`."""
    return (q.to(scale.dtype) - zero_point) * scale


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [lo, hi] (elementwise, any shape) onto the b-bit grid.

    The range is widened to contain 0 so that zero (padding, ReLU output) is represented exactly.
    Asymmetric: s = (hi - lo) / (2^b - 1), z = round(-lo / s).
    Symmetric: z = 2^(b-1), s = max(|lo|, |hi|) / (2^(b-1) - 1), so ±max|x| both lie on the grid.
    """
    qmin, qmax = qrange(bits)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        bound = torch.maximum(-lo, hi)
        zero_point = torch.full_like(bound, float(2 ** (bits - 1)))
        scale = torch.clamp(bound / (qmax - zero_point), min=eps)
    else:
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
        zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


def channel_view(t: torch.Tensor, ndim: int, axis: int = 0) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along `axis` of an `ndim`-dimensional tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10·log10(||x||² / ||x - x̂||²) in dB."""
    signal = reference.double().pow(2).sum()
    noise = (reference.double() - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))


def keep_mask(x: torch.Tensor, p: float, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A boolean mask shaped like `x` (or `shape`, on x's device), each element True with probability `p`. For
    p = 1/2 (QDrop's default) the bits of random 64-bit integers are used: 64 mask elements per random number,
    several times cheaper than `rand`. The mask is a view of 0/1 bytes (`_as_weights` reads it without a copy)."""
    shape = tuple(x.shape if shape is None else shape)
    numel = math.prod(shape)
    if p != 0.5:
        return torch.rand(shape, device=x.device) < p
    words = torch.empty((numel + 63) // 64, dtype=torch.int64, device=x.device).random_(-(2**63), 2**63 - 1)
    return _bits(words.view(torch.uint8))[:numel].view(torch.bool).view(shape)


@fused
def _bits(octets):
    """The bits of n bytes as 8·n 0/1 bytes, bit plane by bit plane: element j·n + i is bit j of byte i (byte by
    byte, a compiled kernel would fill a vector register with only 8 results at a time)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=octets.device)
    return octets.view(1, -1).bitwise_right_shift(shifts.view(-1, 1)).bitwise_and(1).view(-1)


def _as_weights(keep: torch.Tensor) -> torch.Tensor:
    """A bool mask flattened as the kernels take it: 0/1 bytes (a view) on CPU, where compiled kernels read bool
    tensors an element at a time; bool elsewhere."""
    flat = keep.reshape(-1)
    return flat.view(torch.uint8) if flat.device.type == "cpu" else flat


@fused
def _act_forward(x, scale, lo, hi, keep, floor, ceil):
    """`_ActFakeQuant.forward` over a flat x in one pass, with the grid [lo, hi] in units of the step (0-d tensors:
    integer arguments would be symbolic in the kernel, which then runs at half speed), `keep` a mask
    (`_as_weights`) or None, and [floor, ceil] a preceding ReLU/ReLU6's range (0-d tensors) or None."""
    if floor is not None:
        x = torch.clamp(x, floor, ceil)
    out = torch.clamp(torch.round(x / scale), lo, hi) * scale
    return out if keep is None else torch.lerp(x, out, keep.to(x.dtype))  # exact at 0 and 1


@fused
def _act_backward(grad, x, scale, lo, hi, keep, floor, ceil, need_x: bool, need_scale: bool):
    """(∂L/∂x or None, Σ ∂L/∂out · ∂out/∂s or None) over flat tensors in one pass, recomputed from x: reading x
    again costs less than writing a gradient mask and the step coefficients in the forward and reading them here."""
    active = None
    if floor is not None:  # the clamp's own gradient, as ReLU/ReLU6 have it: 1 strictly inside its range
        active = (x > floor) & (x < ceil)
        x = torch.clamp(x, floor, ceil)
    v = x / scale
    inside = (v >= lo) & (v <= hi)  # LSQ: clipping decided by x/s itself, not by its rounding
    grad_x = grad_s = None
    if need_x:
        passes = inside if keep is None else inside | (keep == 0)
        grad_x = torch.where(passes if active is None else passes & active, grad, 0.0)
    if need_scale:
        level = torch.clamp(torch.round(v), lo, hi)
        coeff = torch.where(inside, level - v, level)
        if keep is not None:
            coeff = coeff * keep.to(x.dtype)
        grad_s = (grad * coeff).sum()
    return grad_x, grad_s


class _ActFakeQuant(torch.autograd.Function):
    """Per-tensor fake quantization with QDrop mixing and an LSQ step-size gradient, in one pass over the tensor
    each way (compiled where possible, `ptq._fuse`), optionally after a clamp (a ReLU/ReLU6 taken into the pass).

    Forward: x̂ = (clamp(round(x/s) + z, qmin, qmax) − z)·s; where `keep` is given, out = keep ? x̂ : x.
    Backward (straight-through, LSQ arXiv 1902.08153): ∂out/∂x = 1 where the element passes FP or x/s + z lies
    inside [qmin, qmax], else 0; ∂out/∂s = round(x/s) − x/s inside the grid, (qmin|qmax) − z where clipped, 0 where
    FP passes; the step's gradient is multiplied by `grad_factor` (LSQ's 1/√(N·Qp)). The forward keeps x and the
    mask (a byte per element); the backward recomputes what it needs from them.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, keep, grad_factor, clip):
        flat = _as_weights(keep) if keep is not None else None
        zero_point = zero_point.reshape(()).to(x.dtype)
        lo, hi = qmin - zero_point, qmax - zero_point  # the grid in units of the step, zero point removed
        floor, ceil = (None, None) if clip is None else (x.new_full((), clip[0]), x.new_full((), clip[1]))
        step = scale.reshape(())
        out = _act_forward(x.reshape(-1), step, lo, hi, flat, floor, ceil)
        ctx.save_for_backward(x, step.detach(), lo, hi, flat, floor, ceil)
        ctx.grad_factor, ctx.scale_shape = grad_factor, scale.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x, scale, lo, hi, keep, floor, ceil = ctx.saved_tensors
        need_x, need_scale = ctx.needs_input_grad[:2]
        grad_x, grad_s = _act_backward(
            grad.reshape(-1), x.reshape(-1), scale, lo, hi, keep, floor, ceil, need_x, need_scale
        )
        if grad_s is not None:
            grad_s = grad_s.mul(ctx.grad_factor).reshape(ctx.scale_shape)
        return grad_x.view(grad.shape) if grad_x is not None else None, grad_s, None, None, None, None, None, None


@fused
def _lerp(fp, quantized, kept):
    return torch.lerp(fp, quantized, kept.to(fp.dtype))


def mix(fp: torch.Tensor, quantized: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """QDrop's element-wise choice: `quantized` where the bool mask `kept` is True, `fp` elsewhere, in one pass
    (`lerp` is exact at weights 0 and 1)."""
    return _lerp(fp.reshape(-1), quantized.reshape(-1), _as_weights(kept)).view(fp.shape)


def act_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    keep_prob: float | None = None,
    grad_factor: float = 1.0,
    clip: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Per-tensor fake quantization of an activation (scalar `scale`/`zero_point`), differentiable in x and in the
    step. With `keep_prob` p < 1 (QDrop arXiv 2203.05740) each element keeps its quantized value with probability p
    and passes x otherwise. With `clip` (lo, hi), x is clamped to it first (a ReLU or ReLU6 done in the same pass).
    Same values as `fake_quantize`; cheaper in time and memory."""
    qmin, qmax = qrange(bits)
    keep = keep_mask(x, keep_prob) if keep_prob is not None and keep_prob < 1 else None
    if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad):
        with torch.no_grad():  # the forward kernel alone: one pass instead of six
            z = zero_point.reshape(()).to(x.dtype)
            floor, ceil = (None, None) if clip is None else (x.new_full((), clip[0]), x.new_full((), clip[1]))
            flat = None if keep is None else _as_weights(keep)
            return _act_forward(x.reshape(-1), scale.reshape(()), qmin - z, qmax - z, flat, floor, ceil).view(x.shape)
    return _ActFakeQuant.apply(x, scale, zero_point, qmin, qmax, keep, grad_factor, clip)
