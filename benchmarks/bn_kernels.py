"""Cost of a BatchNorm layer with its input statistics, summed over every BN layer of a model, per way of computing it.

Synthesis needs each eval-mode BatchNorm's output and Σx, Σx² of its input, forward and backward. Over the BN inputs
of one batch (shapes recorded from the model), in interleaved rounds whose medians count:

- `torch BN` — torch's BatchNorm alone, forward and input gradient: what a bare forward+backward pays;
- `torch BN + hook` — the same plus the hooked path's statistics (`ChannelSums`) and autograd's sum of the two
  gradients;
- `fused, op by op` and `fused, compiled` — `FusedBatchNorm`'s two kernels (`ptq.synth.stats`), eager and compiled.

Then the two fused forms on single tensors of growing size: where the compiled pair's fixed cost per call stops
outweighing what it saves (`FusedBatchNorm` runs tensors below `COMPILED_FROM` elements op by op).

    python benchmarks/bn_kernels.py [--model tf_efficientnet_lite0] [--batch 8] [--rounds 7] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ptq.arch import is_batchnorm
from ptq.models import load_model
from ptq.synth.stats import (
    COMPILED_FROM,
    _normalize_and_sum,
    _normalize_and_sum_backward,
    _statistics_grad,
    _sums,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import device_name, write_result  # noqa: E402  (also keeps freed memory, as the command line does)


def layer_inputs(model, size, batch, device) -> list[tuple]:
    """(x, ∂L/∂y, module, a, b, g₁, g₂) for every BN layer, x of the shape its input has on a batch."""
    shapes = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args: shapes.append((args[0].shape, m)))
        for m in model.modules()
        if is_batchnorm(m) and m.running_var is not None
    ]
    with torch.no_grad():
        model(torch.randn(batch, *size, device=device))
    for h in hooks:
        h.remove()
    layers = []
    for shape, m in shapes:
        x, gy, _, a, _, g1, g2 = layer_of_shape(shape, device)
        scale = torch.rsqrt(m.running_var + m.eps) * m.weight.detach()
        shift = m.bias.detach() - m.running_mean * scale
        layers.append((x, gy, m, scale.view(a.shape), shift.view(a.shape), g1, g2))
    return layers


def torch_bn(x, m):
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def torch_bn_backward(gy, x, m):
    args = (gy, x, m.weight, m.running_mean, m.running_var, None, None, False, m.eps, [True, False, False])
    return torch.ops.aten.native_batch_norm_backward(*args)[0]


WAYS = {
    "torch BN": (
        lambda x, gy, m, a, b, g1, g2: torch_bn(x, m),
        lambda x, gy, m, a, b, g1, g2: torch_bn_backward(gy, x, m),
    ),
    "torch BN + hook": (
        lambda x, gy, m, a, b, g1, g2: (torch_bn(x, m), _sums(x)),
        lambda x, gy, m, a, b, g1, g2: torch_bn_backward(gy, x, m) + _statistics_grad(x, g1, g2),
    ),
    "fused, op by op": (
        lambda x, gy, m, a, b, g1, g2: _normalize_and_sum.eager(x, a, b),
        lambda x, gy, m, a, b, g1, g2: _normalize_and_sum_backward.eager(gy, x, a, g1, g2),
    ),
    "fused, compiled": (
        lambda x, gy, m, a, b, g1, g2: _normalize_and_sum(x, a, b),
        lambda x, gy, m, a, b, g1, g2: _normalize_and_sum_backward(gy, x, a, g1, g2),
    ),
}


SWEEP = [(1, 16, 4, 4), (1, 32, 16, 16), (1, 96, 16, 16), (4, 64, 16, 16), (1, 32, 112, 112), (8, 32, 56, 56)]


def size_sweep(rounds: int, device: torch.device) -> list[dict]:
    """Fused forward + backward of one tensor per shape, op by op and compiled, repeated to ~10⁷ elements a round."""
    rows = []
    for shape in SWEEP:
        layer = layer_of_shape(shape, device)
        repeat = max(5, min(2000, 10**7 // layer[0].numel()))
        median = {}
        for name in ("fused, op by op", "fused, compiled"):
            forward, backward = WAYS[name]
            both = [
                timed(lambda *a, f=forward, b=backward: (f(*a), b(*a)), [layer] * repeat, device) for _ in range(rounds)
            ]
            median[name] = statistics.median(both) / repeat * 1e6
        rows.append({"shape": list(shape), "elements": layer[0].numel()} | {f"{k} us": v for k, v in median.items()})
        print(
            f"{str(shape):18s} {layer[0].numel():>9,d} elements: op by op {median['fused, op by op']:8.1f} µs, "
            f"compiled {median['fused, compiled']:8.1f} µs"
        )
    return rows


def layer_of_shape(shape, device) -> tuple:
    """(x, ∂L/∂y, no module, a, b, g₁, g₂), random, for an input of `shape`."""
    channel, per_image = (-1,) + (1,) * (len(shape) - 2), (*shape[:2],) + (1,) * (len(shape) - 2)
    a, b = torch.randn(shape[1], device=device).view(channel), torch.randn(shape[1], device=device).view(channel)
    g1, g2 = torch.randn(per_image, device=device), torch.randn(per_image, device=device)
    return torch.randn(shape, device=device), torch.randn(shape, device=device), None, a, b, g1, g2


def timed(fn, layers, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for layer in layers:
        fn(*layer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7, help="Interleaved rounds; the median of each counts.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    model, data_config = load_model(args.model, device=device)
    layers = layer_inputs(model, tuple(data_config["input_size"]), args.batch, device)
    times = {(way, part): [] for way in WAYS for part in ("forward", "backward")}
    with torch.no_grad():
        for forward, backward in WAYS.values():  # warm-up, and the compiled kernels compile here
            timed(forward, layers, device), timed(backward, layers, device)
        for _ in range(args.rounds):
            for way, (forward, backward) in WAYS.items():
                times[way, "forward"].append(timed(forward, layers, device))
                times[way, "backward"].append(timed(backward, layers, device))
    rows = []
    for way in WAYS:
        fwd, bwd = statistics.median(times[way, "forward"]), statistics.median(times[way, "backward"])
        rows.append({"way": way, "forward_ms": fwd * 1e3, "backward_ms": bwd * 1e3, "total_ms": (fwd + bwd) * 1e3})
        print(f"{way:18s} forward {fwd * 1e3:7.1f} ms  backward {bwd * 1e3:7.1f} ms  total {(fwd + bwd) * 1e3:7.1f} ms")
    print(f"single tensors (FusedBatchNorm compiles from {COMPILED_FROM:,d} elements):")
    with torch.no_grad():
        sweep = size_sweep(args.rounds, device)
    result = {
        "model": args.model,
        "batch": args.batch,
        "bn_layers": len(layers),
        "rounds": args.rounds,
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "compiled_from": COMPILED_FROM,
        "sizes": sweep,
    }
    write_result(result, f"bn_kernels_{args.model}_b{args.batch}_{device.type}.json", args.out)


if __name__ == "__main__":
    main()
