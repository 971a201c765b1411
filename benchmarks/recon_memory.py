"""Peak memory of a whole reconstruction: one unit's cache at a time (ptq) vs caching every unit first (naive).

Each mode runs in a fresh process on the same model, images and settings, with the cache on the device
(`recon.cache=device`); memory does not depend on the number of iterations, so each unit runs only a few. Peak is
torch's peak allocated memory on CUDA, the process's peak resident set on CPU (which includes the model and the
framework, the same in both modes). The naive mode is what reference implementations do: collect the inputs and
targets of every unit for the whole calibration set, then reconstruct.

    python benchmarks/recon_memory.py [--model tf_efficientnet_lite0] [--images 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from ptq.config import Method, QuantConfig, ReconConfig
from ptq.models import load_model
from ptq.quant import calibrate, prepare
from ptq.recon.engine import collect, reconstruct_unit
from ptq.recon.run import plan_cache, reconstruct, settings_for, units_for

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import device_name, write_result  # noqa: E402


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, data_config = load_model(args.model, device=device)
    x = torch.randn(args.images, *data_config["input_size"])
    batches = [x[i : i + args.batch].to(device) for i in range(0, args.images, args.batch)]
    config = QuantConfig(w_bits=4, a_bits=4)
    qmodel = calibrate(prepare(model, config, batches[0][:1]), batches, config)
    method = Method(args.method)
    recon = ReconConfig(iters=args.iters, batch_size=args.batch, cache="device", cache_dtype=args.cache_dtype)
    settings = settings_for(method, recon)
    units = units_for(qmodel, method, batches[0][:1])
    plan = plan_cache(units, args.images, recon, settings, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_mb(device)
    if args.mode == "ptq":
        reconstruct(qmodel, batches, method, recon)
    else:
        cached = [collect(qmodel, u, batches, device, plan.dtype, settings.keep_prob < 1) for u in units]
        for unit, data in zip(units, cached, strict=True):
            reconstruct_unit(qmodel, unit, data, settings)
    return {
        "mode": args.mode,
        "peak_mb": round(peak_mb(device), 1),
        "peak_before_mb": round(before, 1),
        "estimate": plan.describe(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--method", default="qdrop")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--cache-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", choices=["ptq", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args)))
        return
    rows = []
    for mode in ("ptq", "naive"):
        cmd = [sys.executable, __file__, "--mode", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("mode", "out")
        ]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(line))
        print(f"{mode:6s} peak {rows[-1]['peak_mb']:9.1f} MB", flush=True)
    ratio = rows[1]["peak_mb"] / rows[0]["peak_mb"]
    est = rows[0]["estimate"]
    print(
        f"naive ÷ ptq peak memory = {ratio:.2f}; cache estimate: largest unit {est['peak_unit_mb']} MB, "
        f"all units {est['all_units_mb']} MB ({est['dtype']})"
    )
    device = torch.device(args.device)
    result = {
        "model": args.model,
        "method": args.method,
        "images": args.images,
        "batch": args.batch,
        "cache_dtype": args.cache_dtype,
        "device": device_name(device),
        "peak_measure": "torch max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "naive_over_ptq": round(ratio, 3),
        "rows": rows,
    }
    name = f"recon_memory_{args.model}_{args.images}img_{args.cache_dtype}_{device.type}.json"
    write_result(result, name, args.out)


if __name__ == "__main__":
    main()
