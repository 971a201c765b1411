"""Reconstruction losses: the squared error of a unit's output against its FP targets (optionally Fisher-weighted),
computed from cache rows in one compiled kernel each way, and the Lp loss of BRECQ's activation-step pass."""

from __future__ import annotations

import torch

from ptq._fuse import fused


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
