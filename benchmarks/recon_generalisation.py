"""Do reconstructed units generalise? Each unit's reconstruction error on the calibration images and on held-out images.

    python benchmarks/recon_generalisation.py [--w-bits 4 --a-bits 4] [--iters 1000] [--methods rtn,brecq,qdrop]

On the Fashion-MNIST ResNet-18 (`fashion_mnist.py train` first), calibrated on 1,024 real training images: after
round-to-nearest and after each reconstruction method, every unit's error Σ_c(ẑ − z)² (its input from the final
quantized model, its target from the FP model, as during reconstruction) on the 1,024 calibration images and on 1,024
other training images, and top-1 on the 10k test set. A unit whose calibration error falls below round-to-nearest's
while its held-out error rises above it has fitted its rounding to the calibration set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ptq._io import write_json
from ptq.config import Method, QuantConfig, ReconConfig
from ptq.quant import prepare
from ptq.recon.engine import collect, fp_reference, unit_error
from ptq.recon.run import units_for

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import fashion_mnist as fm  # noqa: E402
from recon_quality import cell  # noqa: E402
from synth_quality import judge  # noqa: E402


def unit_errors(qmodel, reference, units, images, batch) -> dict[str, float]:
    batches = [images[i : i + batch] for i in range(0, len(images), batch)]
    return {
        u.name: unit_error(qmodel, u, collect(qmodel, u, batches, fp_inputs=False, reference=reference)) for u in units
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--methods", default="rtn,brecq,qdrop")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")
    model, _ = fm.trained(device)
    xtr, _ = fm.load("train")
    xte, yte = fm.load("t10k")
    order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))
    calib, held_out = xtr[order[:1024]], xtr[order[1024:2048]]  # the calibration set of recon_quality.py, and others
    recon = ReconConfig(iters=args.iters, batch_size=32, lr=args.lr)
    config = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits)
    reference = fp_reference(prepare(model, config, calib[:1]))  # the FP network, laid out as the quantized one
    result = {"w_bits": args.w_bits, "a_bits": args.a_bits, "iters_per_unit": args.iters, "lr": args.lr, "rows": []}
    for name in args.methods.split(","):
        method = Method(name)
        qmodel, info = cell(model, calib, args.w_bits, args.a_bits, method, recon, device)
        units = units_for(qmodel, Method.BRECQ, calib[:1])  # the same blocks for every method
        errors = {"calibration": unit_errors(qmodel, reference, units, calib, 64)}
        errors["held_out"] = unit_errors(qmodel, reference, units, held_out, 64)
        top1 = judge(qmodel, model, xte, yte, device)["top1"]
        result["rows"].append({"method": name, "top1": top1, **errors, **info})
        print(f"{name:9s} top-1 {top1:.2f}%", flush=True)
        for u in units:
            cal, held = errors["calibration"][u.name], errors["held_out"][u.name]
            print(f"  {u.name:10s} calibration {cal:10.4f}  held-out {held:10.4f}")
    name = f"recon_generalisation_fmnist_w{args.w_bits}a{args.a_bits}_{args.iters}it_cpu.json"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
