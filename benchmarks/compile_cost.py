"""What compiling the element-wise kernels costs: a whole reconstruction with an empty compiler cache, with a
warm one, and op by op (`PTQ_COMPILE=0`).

Each mode runs in a fresh process (the compiler's in-memory caches start empty) on the same model, random
calibration images and settings: every unit of the model, a few iterations each, so that the wall time is mostly
compilation and set-up. The cold run gets an empty inductor cache folder; the warm run reuses it.

    python benchmarks/compile_cost.py [--model resnet18 --checkpoint benchmarks/weights/fmnist_resnet18.safetensors]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ptq.config import Method, QuantConfig, ReconConfig
from ptq.models import load_model
from ptq.quant import calibrate, prepare
from ptq.recon.run import reconstruct

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import device_name, write_result  # noqa: E402


def run_once(args) -> float:
    """Seconds for the whole reconstruction, in this process."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, data_config = load_model(args.model, checkpoint=args.checkpoint, device=device)
    x = torch.randn(args.images, *data_config["input_size"], device=device)
    batches = [x[i : i + args.batch] for i in range(0, args.images, args.batch)]
    config = QuantConfig(w_bits=4, a_bits=4)
    qmodel = calibrate(prepare(model, config, batches[0][:1]), batches, config)
    start = time.perf_counter()
    reconstruct(qmodel, batches, Method(args.method), ReconConfig(iters=args.iters, batch_size=args.batch))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--checkpoint", default="benchmarks/weights/fmnist_resnet18.safetensors")
    parser.add_argument("--method", default="qdrop")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"seconds": run_once(args)}))
        return
    passed = [a for a in sys.argv[1:] if a != "--child"]
    seconds = {}
    with tempfile.TemporaryDirectory() as cache:
        modes = {
            "cold": {"TORCHINDUCTOR_CACHE_DIR": cache},
            "warm": {"TORCHINDUCTOR_CACHE_DIR": cache},
            "op_by_op": {"PTQ_COMPILE": "0"},
        }
        for mode, env in modes.items():
            out = subprocess.run(
                [sys.executable, __file__, *passed, "--child"], env={**os.environ, **env},
                capture_output=True, text=True, check=True, cwd=ROOT,
            )  # fmt: skip
            seconds[mode] = round(json.loads(out.stdout.strip().splitlines()[-1])["seconds"], 1)
            print(f"{mode:9s} {seconds[mode]:6.1f} s")
    result = {
        "model": args.model,
        "method": args.method,
        "images": args.images,
        "batch": args.batch,
        "iters": args.iters,
        "device": device_name(torch.device(args.device)),
        "torch": torch.__version__,
        "seconds": seconds,
    }
    write_result(result, f"compile_cost_{args.model}_{args.method}_{torch.device(args.device).type}.json", args.out)


if __name__ == "__main__":
    main()
