"""Where a low-bit model loses: weights against activations, and each activation quantizer on its own.

    python benchmarks/act_sensitivity.py lite0 [--bits 4/4] [--images 64 --synth-iters 100] [--calib photos]

The model is calibrated round-to-nearest (the recipe `rtn` at the given bits) on the zero-shot set the default
recipe would synthesize (or on the sample photos), then judged against FP on the 66 sample photos (agreement,
KL(FP‖Q), logit SQNR) with: everything quantized; activations only; weights only; and, for every activation
quantizer, that quantizer alone (weights and all other activations FP). Each single-quantizer row is also judged
on the calibration images themselves, which shows how well they stand in for the photos. Writes
`benchmarks/results/act_sensitivity_lite0_<source>_W<w>A<a>_cpu.json` and prints the quantizers by their KL.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ptq.models import load_model
from ptq.quant.modules import act_quantizers, set_quant_state

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import device_name, write_result  # noqa: E402
from rounding_quality import cell, photos, synthetic_set  # noqa: E402
from synth_quality import judge  # noqa: E402


def scores(summary: dict) -> dict:
    return {k: round(summary[k], 4) for k in ("agreement", "kl", "sqnr_db")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["lite0"])
    parser.add_argument("--bits", default="4/4", help="W/A, e.g. 4/4")
    parser.add_argument("--calib", choices=["synthetic", "photos"], default="synthetic")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--synth-iters", type=int, default=100)
    parser.add_argument("--synth-lr", type=float, default=0.1)
    args = parser.parse_args()
    device = torch.device("cpu")
    w, a = map(int, args.bits.split("/"))
    name = "tf_efficientnet_lite0"
    model, data_config = load_model(name, device=device)
    x = photos(data_config)
    if args.calib == "synthetic":
        calib, folder = synthetic_set(model, name, data_config, args.images, args.synth_iters, args.synth_lr, device)
        source = f"intraq{args.images}-it{args.synth_iters}"
    else:
        calib, folder, source = x, "data/samples", "photos"
    qmodel, _ = cell(model, calib, [f"quant.w_bits={w}", f"quant.a_bits={a}"], 32, device)
    result = {"model": name, "calibration": folder, "images": len(calib), "w_bits": w, "a_bits": a,
              "device": device_name(device), "quantizers": []}  # fmt: skip
    for label, weights, acts in (("all", True, True), ("activations only", False, True), ("weights only", True, False)):
        set_quant_state(qmodel, weights=weights, activations=acts)
        result[label] = scores(judge(qmodel, model, x, None, device))
        print(f"{label:18s} {result[label]}", flush=True)
    quantizers = act_quantizers(qmodel)
    for qname, quantizer in quantizers.items():
        set_quant_state(qmodel, weights=False, activations=False)
        quantizer.enabled = quantizer.calibrated
        row = {
            "quantizer": qname,
            "bits": quantizer.bits,
            "scale": round(float(quantizer.scale), 5),
            "zero_point": int(quantizer.zero_point),
            "photos": scores(judge(qmodel, model, x, None, device)),
            "calibration_images": scores(judge(qmodel, model, calib, None, device)),
        }
        result["quantizers"].append(row)
        print(f"{qname:42s} photos KL {row['photos']['kl']:.4f}  calibration images KL "
              f"{row['calibration_images']['kl']:.4f}", flush=True)  # fmt: skip
    rows = result["quantizers"]
    result["sum_of_single_kl"] = round(sum(r["photos"]["kl"] for r in rows), 4)
    write_result(result, f"act_sensitivity_lite0_{source}_W{w}A{a}_{device.type}.json")
    print(f"\nsum of the single-quantizer KLs on the photos: {result['sum_of_single_kl']:.3f}")
    print("| quantizer | bits | KL photos | KL calibration images | agreement photos |\n|---|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: -r["photos"]["kl"])[:10]:
        print(f"| {r['quantizer']} | {r['bits']} | {r['photos']['kl']:.3f} | {r['calibration_images']['kl']:.3f} | "
              f"{r['photos']['agreement']:.1f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
