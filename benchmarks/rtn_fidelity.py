"""Round-to-nearest PTQ fidelity and checkpoint size of a timm model on the sample photos.

For each setting, runs the main job (`ptq.pipeline.quantize`, the same code as `ptq quantize`) calibrated and judged
on the same real photos, and records agreement with FP top-1, KL(FP‖Q), logit SQNR, the packed checkpoint's size
relative to the FP32 weights, and the wall time of each stage. Writes JSON to benchmarks/results/.

    python benchmarks/rtn_fidelity.py [--model tf_efficientnet_lite0] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import ptq

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [  # (label, w_bits, a_bits, bit convention)
    ("W8A8", 8, 8, "qdrop"),
    ("W4A8", 4, 8, "qdrop"),
    ("W4A8 all-4-bit weights", 4, 8, "all"),
    ("W4A4", 4, 4, "qdrop"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--data", default="data/samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON results file [default: benchmarks/results/...]")
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    rows = []
    for label, w, a, convention in SETTINGS:
        start = time.perf_counter()
        qmodel = ptq.quantize(
            args.model, calib=args.data, eval_data=args.data, recipe="rtn", w_bits=w, a_bits=a,
            first_last_bits=convention, device=args.device,
        )  # fmt: skip
        wall = time.perf_counter() - start
        report = qmodel.report.to_dict()
        ev = report["evaluation"]
        rows.append(
            {
                "setting": label,
                "w_bits": w,
                "a_bits": a,
                "bit_convention": convention,
                "images": ev["images"],
                "agreement": ev["agreement"],
                "kl": ev["kl"],
                "sqnr_db": ev["sqnr_db"],
                "size_ratio": report["size"]["ratio"],
                "checkpoint_mb": report["size"]["checkpoint_bytes"] / 1e6,
                "fp32_mb": report["size"]["fp32_bytes"] / 1e6,
                "timings_s": report["timings_s"],
                "wall_s": round(wall, 2),
            }
        )
        r = rows[-1]
        print(
            f"{label:26s} agree {r['agreement']:6.2f}%  KL {r['kl']:.4f}  SQNR {r['sqnr_db']:6.2f} dB  "
            f"size {r['size_ratio']:.3f}× ({r['checkpoint_mb']:.2f} MB)  wall {r['wall_s']:.1f}s",
            flush=True,
        )
    out = (
        Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "results" / f"rtn_fidelity_{args.model}_{args.device}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": args.model,
        "data": args.data,
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
