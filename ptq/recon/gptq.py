"""Second-order weight rounding of one layer (OBQ arXiv 2208.11580, GPTQ arXiv 2210.17323) and what it needs from
the layer's inputs.

A layer computes y = W·x + b for every column x of its unfolded input: for a convolution, x is one receptive field
(Cin/groups·kh·kw values, the im2col unfolding, padding included), for a linear layer one input vector. With X the
matrix of all such columns over the calibration images, the rounding Ŵ on the layer's grid minimises

    ‖W·X − Ŵ·X‖²  =  tr((W − Ŵ)·H·(W − Ŵ)ᵀ) / 2,        H = 2·X·Xᵀ   (d × d, shared by every output row)

A grouped convolution has one H per group; a depthwise 3×3 convolution is C independent problems of size 9, solved
as one batch. H is dampened (H += δ·mean(diag H)·I, δ = 0.01) so that it is invertible; an input that never fires
(H_ii = 0) gets H_ii = 1: nothing in the data constrains its weight, which is then simply rounded to nearest.
Columns are quantized one at a time, in order of decreasing H_ii ("act order") or as they come, each error spread
onto the columns not yet quantized through the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU):

    q_j = Q(w_j),   e = (w_j − q_j) / U_jj,   w_{j+1:} −= e · U_{j, j+1:}

with the updates of a block of columns applied to the rest of the matrix at once ("lazy batch" updates). Q is the
layer's calibrated per-channel grid, so the codes pack as round-to-nearest codes do.

Empirical bias correction (DFQ arXiv 1906.04721, on data) needs only the mean input column μ: on the same inputs
the rounding shifts output channel r by ((W − Ŵ)·μ)_r on average, which the bias takes back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptq.arch import CONV_SAME

CHUNK_ELEMENTS = 1 << 24  # unfold at most this many input values at a time (64 MiB in float32)
MAX_DAMP_TRIES = 6  # a Hessian that Cholesky still rejects is dampened 10× more, this many times


def supported(layer: nn.Module) -> bool:
    """Whether the layer is exactly y = W·unfold(x) + b as `unfold` computes it: plain convolutions (any padding,
    stride, dilation, groups), timm's dynamic "SAME"-padding convolution, and linear layers. A subclass that
    changes its weight in `forward` (weight standardisation, ...) is not."""
    return type(layer) in (nn.Conv2d, nn.Linear, *CONV_SAME)


def groups_of(layer: nn.Module) -> int:
    return layer.groups if isinstance(layer, nn.Conv2d) else 1


def _padded(layer: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The input as the convolution reads it, and the padding that unfold must still add."""
    if isinstance(layer, CONV_SAME):
        from timm.layers.padding import pad_same

        return pad_same(x, layer.weight.shape[-2:], layer.stride, layer.dilation), (0, 0)
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=mode), (0, 0)
    return x, layer.padding


def _pointwise(layer: nn.Module) -> bool:
    """A 1×1 convolution that reads every input position: its columns are the input's pixels as they lie."""
    return (
        type(layer) is nn.Conv2d
        and layer.kernel_size == (1, 1)
        and layer.stride == (1, 1)
        and layer.padding in ((0, 0), "valid")
    )


def unfold(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input columns as (groups, d, columns): W_g (rows, d) @ result[g] gives group g's outputs."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)
    groups = layer.groups
    x, padding = _padded(layer, x)
    n = x.shape[0]
    if _pointwise(layer):
        cols = x.reshape(n, groups, -1, x.shape[2] * x.shape[3])
    else:
        cols = F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)
        cols = cols.view(n, groups, cols.shape[1] // groups, cols.shape[2])
    return cols.permute(1, 2, 0, 3).reshape(groups, cols.shape[2], -1)


def weight_matrix(layer: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight as (groups, rows per group, d)."""
    w = layer.weight if weight is None else weight
    g = groups_of(layer)
    return w.reshape(g, w.shape[0] // g, -1)


class InputStatistics:
    """Running Σ x·xᵀ, Σ x and the column count of a layer's unfolded inputs, in float64 (memory independent of
    the number of images; sums over processes add up)."""

    def __init__(self, layer: nn.Module, hessian: bool = True):
        self.layer = layer
        g = groups_of(layer)
        d = weight_matrix(layer).shape[-1]
        device = layer.weight.device
        self.xxt = torch.zeros((g, d, d), dtype=torch.float64, device=device) if hessian else None
        self.sum = torch.zeros((g, d), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self._per_image: int | None = None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add the columns of a batch of inputs (as the layer receives them), a few images at a time."""
        if self._per_image is None:
            self._per_image = max(1, unfold(self.layer, x[:1].float()).numel())
        step = max(1, CHUNK_ELEMENTS // self._per_image)
        pointwise = _pointwise(self.layer)
        for i in range(0, x.shape[0], step):
            # float64 products and sums (a float32 product is exact in float64): how the images are grouped into
            # batches, or shared out over processes, then changes the sums only in their last digits
            chunk = x[i : i + step].double()
            if pointwise:  # no copy: (images, groups, d, positions), products summed over the images
                cols = chunk.reshape(chunk.shape[0], self.sum.shape[0], self.sum.shape[1], -1)
                self.sum += cols.sum((0, 3))
                self.count += cols.shape[0] * cols.shape[3]
                if self.xxt is not None:
                    self.xxt += torch.matmul(cols, cols.transpose(2, 3)).sum(0)
                continue
            cols = unfold(self.layer, chunk)
            self.sum += cols.sum(-1)
            self.count += cols.shape[-1]
            if self.xxt is not None:
                self.xxt += torch.bmm(cols, cols.transpose(1, 2))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.xxt, self.sum, self.count) if t is not None]

    # Both are rounded to float32 once summed: the order of the float64 sums (how images were batched, or shared out
    # over processes) moves their last digits, which float32 rounding removes, so that it cannot move a rounding
    # decision (GPTQ amplifies tiny differences of H where H is badly conditioned).
    @property
    def mean(self) -> torch.Tensor:
        """μ: the mean input column, (groups, d)."""
        return (self.sum / self.count.clamp(min=1)).float().double()

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2·X·Xᵀ averaged over the columns (the scale does not change the solution), (groups, d, d)."""
        return (2 * self.xxt / self.count.clamp(min=1)).float().double()


def grid_quantizer(scale: torch.Tensor, zero_point: torch.Tensor, bits: int, groups: int, rows: int):
    """Q for one column (groups, rows) on the layer's per-channel (or per-tensor) grid, in the column's dtype."""
    s = scale.detach().reshape(-1).expand(groups * rows).reshape(groups, rows)
    z = zero_point.detach().reshape(-1).expand(groups * rows).reshape(groups, rows)
    qmax = 2**bits - 1

    def quantize(col: torch.Tensor) -> torch.Tensor:
        ss, zz = s.to(col.dtype), z.to(col.dtype)
        return (torch.clamp(torch.round(col / ss) + zz, 0, qmax) - zz) * ss

    return quantize


@dataclass
class Rounded:
    weight: torch.Tensor  # Ŵ on the grid, (groups, rows, d)
    continuous: torch.Tensor  # each weight as it stood when it was rounded (GPTQ's error-compensated W̃)
    damp: float  # the dampening that made H invertible


class SingularHessian(RuntimeError):
    """H stayed not positive definite after every dampening step."""


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """U with H⁻¹ = UᵀU for H dampened by δ·mean(diag H) (δ raised 10× per failure), per group."""
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    level = diag.mean(-1).clamp(min=1e-12)
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    for _ in range(MAX_DAMP_TRIES):
        lower, info = torch.linalg.cholesky_ex(h + damp * level.view(-1, 1, 1) * eye)
        if not bool(info.any()):
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if not bool(info.any()) and bool(torch.isfinite(upper).all()):
                return upper, damp
        damp *= 10
    raise SingularHessian(f"the input Hessian is not positive definite even dampened by {damp / 10:g}·mean(diag)")


def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantize,
    block_size: int = 128,
    act_order: bool = True,
    damp: float = 0.01,
) -> Rounded:
    """Round `weight` (groups, rows, d) column by column against `hessian` (groups, d, d); see the module docstring.
    `quantize` maps a column (groups, rows) onto the grid. Works in float64 on the weight's device."""
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    g, rows, d = w.shape
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    diag[diag == 0] = 1.0  # dead inputs: no constraint, rounded to nearest and no error spread from them
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)
        w = torch.gather(w, 2, perm.unsqueeze(1).expand(g, rows, d))
        h = torch.gather(torch.gather(h, 1, perm.unsqueeze(2).expand(g, d, d)), 2, perm.unsqueeze(1).expand(g, d, d))
    upper, used = _inverse_cholesky(h, damp)
    q = torch.empty_like(w)
    continuous = torch.empty_like(w)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        w1 = w[:, :, i1:i2].clone()
        errors = torch.empty_like(w1)
        u1 = upper[:, i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = w1[:, :, j]
            continuous[:, :, i1 + j] = col
            qc = quantize(col)
            q[:, :, i1 + j] = qc
            err = (col - qc) / u1[:, j, j].unsqueeze(1)
            w1[:, :, j:] -= err.unsqueeze(2) * u1[:, j, j:].unsqueeze(1)
            errors[:, :, j] = err
        if i2 < d:
            w[:, :, i2:] -= torch.bmm(errors, upper[:, i1:i2, i2:])
    if perm is not None:
        inverse = torch.argsort(perm, dim=-1).unsqueeze(1).expand(g, rows, d)
        q, continuous = torch.gather(q, 2, inverse), torch.gather(continuous, 2, inverse)
    return Rounded(q.to(weight.dtype), continuous.to(weight.dtype), used)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error per column caused by a weight change `delta` (groups, rows, d):
    Σ_r δ_rᵀ·(H/2)·δ_r, with H averaged over the columns (`InputStatistics.hessian`)."""
    d = delta.to(torch.float64)
    return float(0.5 * torch.einsum("grd,gde,gre->", d, hessian.to(torch.float64), d))


def bias_shift(delta: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(W − Ŵ)·μ per output channel (flattened over groups): what the bias takes back."""
    return torch.bmm(delta.to(torch.float64), mean.to(torch.float64).unsqueeze(2)).reshape(-1)
