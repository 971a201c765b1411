"""Cost of one reconstruction iteration ÷ one bare forward+backward of the same unit on the same batch.

For every unit of the model (or the first --units), in one run: the bare step is the unit in FP (quantizers off)
forward and the backward of a fixed output gradient to its weights (no loss: the least a training step can cost);
the reconstruction step is what `reconstruct_unit` does per iteration (mini-batch gathered from the cache, QDrop
masks, AdaRound weights, LSQ steps, loss + regulariser, backward, Adam). Each is timed from two runs of different
length, so set-up cost cancels, in --rounds rounds that alternate the two (the median counts). Target: ≤ 1.3.
The total ratio weights units by their bare cost (it is the ratio of the whole reconstruction's time).

    python benchmarks/recon_speed.py [--model tf_efficientnet_lite0] [--method qdrop] [--batch 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ptq.config import Method, QuantConfig, ReconConfig
from ptq.models import load_model
from ptq.quant import calibrate, prepare
from ptq.quant.modules import set_quant_state
from ptq.recon.engine import collect, reconstruct_unit, total_iters
from ptq.recon.run import settings_for, units_for

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import device_name, write_result  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_iteration(run, short: int, long: int, device) -> float:
    """Seconds per iteration of `run(n)`, from the difference of two lengths (fixed costs cancel)."""
    times = {}
    for n in (short, long):
        sync(device)
        start = time.perf_counter()
        run(n)
        sync(device)
        times[n] = time.perf_counter() - start
    return (times[long] - times[short]) / (long - short)


def paired(runs: dict, short: int, long: int, device, rounds: int) -> dict[str, float]:
    """Median seconds per iteration of each of `runs`, measured in `rounds` interleaved rounds after one warm-up
    round, so that a slow spell of a shared machine weighs on all of them alike and a single one does not count."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds + 1):
        for name, run in runs.items():
            t = per_iteration(run, short, long, device)
            if r:
                samples[name].append(t)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def bare_run(module, x):
    """n forward passes of `module` on `x`, each followed by the backward of a fixed output gradient to every
    parameter: no loss at all, the least a training step can cost."""
    params = [p for p in module.parameters()]
    flags = [p.requires_grad for p in params]
    with torch.no_grad():
        grad = torch.randn_like(module(x))

    def run(n):
        for p in params:
            p.requires_grad_(True)
        for _ in range(n):
            for p in params:
                p.grad = None
            module(x).backward(grad)
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--method", default="qdrop", choices=[m.value for m in Method if m is not Method.RTN])
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--units", type=int, default=0, help="Time only the first N units (0: all).")
    parser.add_argument("--iters", type=int, default=6, help="Iterations of the longer timing run.")
    parser.add_argument("--rounds", type=int, default=3, help="Timing rounds per unit (the median counts).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, data_config = load_model(args.model, checkpoint=args.checkpoint, device=device)
    size = tuple(data_config["input_size"])
    x = torch.randn(2 * args.batch, *size, device=device)
    config = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits)
    qmodel = calibrate(prepare(model, config, x[:1]), [x[: args.batch], x[args.batch :]], config)
    method = Method(args.method)
    recon = ReconConfig(batch_size=args.batch)
    settings = settings_for(method, recon)
    units = units_for(qmodel, method, x[:1])
    units = units[: args.units] if args.units else units
    short, long = 2, max(3, args.iters)
    rows = []
    for unit in units:
        data = collect(qmodel, unit, [x], device, fp_inputs=settings.keep_prob < 1)
        module = unit.module(qmodel)
        state = {k: v.clone() for k, v in qmodel.state_dict().items()}
        bare_step = bare_run(module, data.q_inputs[: args.batch])

        def bare_fp(n, bare_step=bare_step):
            set_quant_state(qmodel, False, False)
            bare_step(n)
            set_quant_state(qmodel, True, True)

        def recon_run(n, unit=unit, data=data, state=state):
            # the second pass of brecq counts as iterations too: time the rounding pass and the step pass alike
            reconstruct_unit(qmodel, unit, data, settings, iters=n, act_iters=n)
            qmodel.load_state_dict(state)

        passes = total_iters(replace(settings, iters=1, act_iters=1), unit, qmodel)
        times = paired({"bare": bare_fp, "recon": recon_run}, short, long, device, args.rounds)
        bare, step = times["bare"], times["recon"] / passes
        rows.append({"unit": unit.name, "bare_ms": 1e3 * bare, "recon_ms": 1e3 * step, "ratio": step / bare})
        print(f"{unit.name:24s} bare {1e3 * bare:8.2f} ms  recon {1e3 * step:8.2f} ms  ratio {step / bare:5.2f}")
    total = sum(r["recon_ms"] for r in rows) / sum(r["bare_ms"] for r in rows)
    print(f"whole model: reconstruction iteration ÷ bare forward+backward = {total:.2f} (target ≤ 1.3)")
    result = {
        "model": args.model,
        "method": args.method,
        "w_bits": args.w_bits,
        "a_bits": args.a_bits,
        "batch": args.batch,
        "iters": args.iters,
        "rounds": args.rounds,
        "resolution": list(size),
        "device": device_name(device),
        "torch": torch.__version__,
        "ratio": round(total, 3),
        "units": rows,
    }
    name = f"recon_speed_{args.model}_{args.method}_b{args.batch}_{device.type}.json"
    write_result(result, name, args.out)


if __name__ == "__main__":
    main()
