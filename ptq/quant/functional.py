"""Uniform affine quantization as pure, vectorised functions.

A tensor x is quantized with a step `scale` s and an integer `zero_point` z onto the unsigned grid {0, ..., 2^b - 1}:

    q = clamp(round(x / s) + z, 0, 2^b - 1),     x̂ = (q - z) · s

Symmetric quantization is the special case z = 2^(b-1) (the grid is centred on zero), so both kinds share one
integer code range and one packing format. `scale` and `zero_point` broadcast against x: a scalar for per-tensor,
shape (C, 1, 1, 1) / (C, 1) for per-output-channel weights.
"""

from __future__ import annotations

import torch


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


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A boolean mask shaped like `x`, each element True with probability `p`. For p = 1/2 (QDrop's default) the
    bits of random bytes are used: 8 mask elements per random number, several times cheaper than `rand_like`."""
    if p == 0.5 and x.numel() % 8 == 0:
        bits = torch.arange(8, dtype=torch.uint8, device=x.device)
        raw = torch.randint(0, 256, (x.numel() // 8, 1), dtype=torch.uint8, device=x.device)
        return raw.bitwise_right_shift(bits).bitwise_and_(1).view(torch.bool).view(x.shape)
    return torch.rand_like(x) < p


class _ActFakeQuant(torch.autograd.Function):
    """Per-tensor fake quantization with QDrop mixing and an LSQ step-size gradient, in few passes over the tensor.

    Forward: x̂ = (clamp(round(x/s) + z, qmin, qmax) − z)·s; where `keep` is given, out = keep ? x̂ : x.
    Backward (straight-through, LSQ arXiv 1902.08153): ∂out/∂x = 1 where the element passes FP or x/s + z lies
    inside [qmin, qmax], else 0; ∂out/∂s = round(x/s) − x/s inside the grid, (qmin|qmax) − z where clipped, 0 where
    FP passes; the step's gradient is multiplied by `grad_factor` (LSQ's 1/√(N·Qp)). The forward keeps only what
    the backward needs: a boolean gradient mask and, if the step learns, the ∂out/∂s coefficients.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, keep, grad_factor):
        lo, hi = qmin - zero_point, qmax - zero_point  # the grid in units of the step, zero point removed
        v = x / scale
        level = torch.round(v).clamp_(lo, hi)
        inside = (v >= lo).logical_and_(v <= hi)  # LSQ: clipping decided by x/s itself, not by its rounded value
        # masks enter arithmetic as multipliers: on CPU `where`/`masked_fill_` cost several elementwise passes each
        kept = keep.to(x.dtype) if keep is not None else None
        coeff = None
        if ctx.needs_input_grad[1]:
            coeff = torch.addcmul(level, v, inside, value=-1)  # level − (x/s inside the grid)
            if kept is not None:
                coeff.mul_(kept)
        del v
        out = level.mul_(scale)
        if kept is not None:
            out = mix(x, out, kept)
            inside.logical_or_(keep.logical_not())
        ctx.save_for_backward(inside, coeff)
        ctx.grad_factor, ctx.scale_shape = grad_factor, scale.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        passes, coeff = ctx.saved_tensors
        grad_x = grad * passes if ctx.needs_input_grad[0] else None
        grad_s = None
        if coeff is not None:
            grad_s = torch.dot(grad.flatten(), coeff.flatten()).mul(ctx.grad_factor).reshape(ctx.scale_shape)
        return grad_x, grad_s, None, None, None, None, None


def mix(fp: torch.Tensor, quantized: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """QDrop's element-wise choice: `quantized` where `kept` is 1, `fp` where it is 0 (a bool or 0/1 float mask).
    `lerp` is exact at weights 0 and 1 and, on CPU, about 3× cheaper than `torch.where`."""
    return torch.lerp(fp, quantized, kept if kept.is_floating_point() else kept.to(fp.dtype))


def act_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    keep_prob: float | None = None,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """Per-tensor fake quantization of an activation (scalar `scale`/`zero_point`), differentiable in x and in the
    step. With `keep_prob` p < 1 (QDrop arXiv 2203.05740) each element keeps its quantized value with probability p
    and passes x otherwise. Same values as `fake_quantize`; cheaper in time and memory."""
    qmin, qmax = qrange(bits)
    keep = keep_mask(x, keep_prob) if keep_prob is not None and keep_prob < 1 else None
    if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad):
        with torch.no_grad():
            out = torch.round(x / scale).add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
            return out if keep is None else mix(x, out, keep)
    return _ActFakeQuant.apply(x, scale, zero_point, qmin, qmax, keep, grad_factor)
