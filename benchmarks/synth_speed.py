"""Cost of one synthesis iteration per method ÷ one bare forward+backward of the model w.r.t. its input.

Same model, batch and resolution, measured in one run, the bare pass and every method in interleaved rounds whose
medians count (these machines are shared and noisy: ratios, not absolute times, are the result). Target: ≤ 1.15 for
bns and intraq. Also records images/second and peak memory (CUDA: peak allocated per method; CPU: the process's peak
resident set after the method's first round, which only grows).

    python benchmarks/synth_speed.py [--model tf_efficientnet_lite0] [--batch 32] [--iters 20] [--rounds 5]
                                     [--device cpu] [--fuse auto|on|off] [--resolution R]

--fuse picks how BN statistics are taken (`ptq.synth.stats.BNStatistics`): `on` computes each BatchNorm and its input
statistics in one op, `off` reads the statistics by a hook beside torch's BatchNorm, `auto` is what synthesis does
(fused on the CPU). --resolution R runs at R×R instead of the model's own input size: at a small batch and
resolution the step is bound by per-op overhead (Python, dispatch, on a GPU kernel launches), not by memory.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from ptq.config import SynthConfig
from ptq.models import load_model
from ptq.synth.synthesizer import ClassStatistics, Synthesizer, class_statistics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import device_name, write_result  # noqa: E402  (also keeps freed memory, as the command line does)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bare_iteration(model, size, batch, iters, device) -> float:
    """Seconds per forward+backward of the model w.r.t. a batch of input pixels (parameters frozen)."""
    model.requires_grad_(False)
    x = torch.randn(batch, *size, device=device, requires_grad=True)
    for _ in range(3):
        model(x).sum().backward()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        x.grad = None
        model(x).sum().backward()
    sync(device)
    return (time.perf_counter() - start) / iters


def method_iteration(model, size, batch, iters, device, method, stats: ClassStatistics | None, fuse) -> float:
    """Seconds per synthesis iteration (loss, backward, optimiser step), from two runs of different length."""

    def run(n):
        config = SynthConfig(method=method, iters=n, batch_size=batch, plateau_window=10)
        synth = Synthesizer(model, size, config, device, stats)
        synth.stats.fuse = fuse
        sync(device)
        start = time.perf_counter()
        synth.batch(0, batch)
        sync(device)
        return time.perf_counter() - start

    run(2)  # warm-up
    short, long = run(iters // 2), run(iters + iters // 2)
    return (long - short) / iters  # set-up and the final forward cancel out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--methods", default="bns,intraq,fdda,genie")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved rounds; the median of each counts.")
    parser.add_argument("--fuse", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--resolution", type=int, default=None, help="R×R inputs (default: the model's own size)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    model, data_config = load_model(args.model, device=device)
    size = tuple(data_config["input_size"])
    if args.resolution:
        size = (size[0], args.resolution, args.resolution)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    real = torch.randn(10, *size, device=device)
    stats = class_statistics(model, real, torch.arange(10, device=device))
    methods = args.methods.split(",")
    fuse = {"auto": None, "on": True, "off": False}[args.fuse]
    times: dict[str, list[float]] = {m: [] for m in ["bare forward+backward", *methods]}
    peaks: dict[str, float] = dict.fromkeys(times, 0.0)
    for r in range(args.rounds):  # interleaved, medians count: a slow spell of a shared machine hits every method alike
        for method in times:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if method in methods:
                t = method_iteration(model, size, args.batch, args.iters, device, method, stats, fuse)
            else:
                t = bare_iteration(model, size, args.batch, args.iters, device)
            times[method].append(t)
            if r == 0 or device.type == "cuda":  # the CPU's peak resident set only grows: its first round tells
                peaks[method] = max(peaks[method], peak_mb(device))
            print(f"round {r + 1}: {method:24s} {t * 1e3:8.1f} ms/iter", flush=True)
    bare = statistics.median(times["bare forward+backward"])
    rows = []
    for method, ts in times.items():
        t = statistics.median(ts)
        rows.append(
            {
                "method": method,
                "s_per_iter": t,
                "rounds_s_per_iter": ts,
                "ratio": t / bare,
                "image_iterations_per_s": args.batch / t,
                "peak_mb": peaks[method],
            }
        )
        print(f"{method:24s} {t * 1e3:8.1f} ms/iter  {t / bare:.3f}×  peak {peaks[method]:.0f} MB", flush=True)
    result = {
        "model": args.model,
        "batch": args.batch,
        "input_size": list(size),
        "iters": args.iters,
        "rounds": args.rounds,
        "fuse": args.fuse,
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    res = f"_r{args.resolution}" if args.resolution else ""
    write_result(result, f"synth_speed_{args.model}_b{args.batch}{res}_{device.type}.json", args.out)


if __name__ == "__main__":
    main()
