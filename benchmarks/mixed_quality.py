"""Mixed precision vs uniform weight bits at the same weight size (activations 8-bit, round-to-nearest).

    python benchmarks/mixed_quality.py fmnist   # needs dataset-fashion-mnist; trains the model first if missing
    python benchmarks/mixed_quality.py lite0

For each trace estimator (hutchinson: double backprop; fisher: squared gradients with sampled labels) the sensitivity
table is measured once on the calibration set; then for uniform W3 and W4 the budget is that uniform model's weight
size (packed codes + scales, first/last layers 8-bit under the default convention) and `--bits auto` allocates
within it. fmnist: the Fashion-MNIST ResNet-18, 256 real training images, top-1 on the 10k test set. lite0:
tf_efficientnet_lite0 calibrated zero-shot on the `fast` recipe's synthetic set, agreement/KL/SQNR against FP on the
66 sample photos. Also timed, in the same run: the sensitivity pass ÷ one forward+backward over the same images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ptq.calibration import default_synth_dir, synthesize_set
from ptq.config import MixedConfig, QuantConfig, TraceEstimator, load_recipe
from ptq.data import ImageFolder
from ptq.mixed import allocate, apply_bits, measure_sensitivity
from ptq.mixed.allocate import Budget, evaluate
from ptq.models import load_model
from ptq.quant import calibrate, prepare, set_quant_state
from ptq.synth import SyntheticSet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import device_name, write_result  # noqa: E402
from synth_quality import judge  # noqa: E402


def fwd_bwd_seconds(model, batches) -> float:
    """One forward+backward (w.r.t. the weights) over the calibration batches: the reference for the ratio."""
    qmodel = set_quant_state(prepare(model, QuantConfig(), batches[0][:1]), weights=False, activations=False)
    qmodel.requires_grad_(True)
    start = time.perf_counter()
    for x in batches:
        F.log_softmax(qmodel(x), 1).sum().backward()
    return time.perf_counter() - start


def quantized(model, batches, bits: dict[str, int] | int, a_bits: int = 8):
    config = QuantConfig(w_bits=bits if isinstance(bits, int) else 8, a_bits=a_bits)
    qmodel = prepare(model, config, batches[0][:1])
    if isinstance(bits, dict):
        apply_bits(qmodel, bits)
    return calibrate(qmodel, batches, config)


def run(model, name, batches, x_eval, y_eval, device, fmt, estimators, probes) -> dict:
    result = {"rows": [], "sensitivity": {}}
    reference = fwd_bwd_seconds(model, batches)
    probe = prepare(model, QuantConfig(), batches[0][:1])
    tables = {}
    for estimator in estimators:
        start = time.perf_counter()
        config = MixedConfig(trace=estimator, probes=probes)
        table = measure_sensitivity(probe, batches, name, QuantConfig(), config)
        seconds = time.perf_counter() - start
        tables[estimator] = table
        result["sensitivity"][estimator.value] = {
            "seconds": round(seconds, 2),
            "fwd_bwd_seconds": round(reference, 2),
            "ratio": round(seconds / reference, 2),
            "trace_seconds": table.trace_seconds,
            "trace_ratio": round(table.trace_seconds / reference, 2),
            "images": table.images,
            "probes": table.probes,
        }
        print(
            f"{estimator.value}: sensitivity {seconds:.1f}s = {seconds / reference:.1f}× one fwd+bwd over the set "
            f"({reference:.2f}s); traces alone {table.trace_seconds:.1f}s = {table.trace_seconds / reference:.1f}×",
            flush=True,
        )
    for b in (3, 4):
        first = next(iter(tables.values()))
        uniform_bits = first.uniform_bits(b)
        budget = evaluate(first, uniform_bits).weight_bytes
        rows = [(f"uniform W{b}", uniform_bits, None)]
        for estimator, table in tables.items():
            allocation = allocate(table, Budget(size_bytes=budget))
            rows.append((f"auto ({estimator.value}) at W{b} size", allocation.bits, allocation))
        for label, bits, allocation in rows:
            summary = judge(quantized(model, batches, bits), model, x_eval, y_eval, device)
            row = {
                "setting": label,
                "budget_bytes": budget,
                "weight_bytes": evaluate(first, bits).weight_bytes,
                "avg_bits": round(evaluate(first, bits).avg_bits, 3),
                **summary,
            }
            if allocation is not None:
                row["bits_histogram"] = {str(w): list(bits.values()).count(w) for w in sorted(set(bits.values()))}
            result["rows"].append(row)
            print(
                f"{label:34s} {row['weight_bytes'] / 1e6:7.3f} MB  {row['avg_bits']:.2f} bits  {fmt(summary)}",
                flush=True,
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["fmnist", "lite0"])
    parser.add_argument("--images", type=int, default=256, help="fmnist: calibration images.")
    parser.add_argument("--estimators", default="fisher,hutchinson", help="Trace estimators to compare.")
    parser.add_argument("--probes", type=int, default=MixedConfig().probes, help="Probes per batch.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.which == "fmnist":
        import fashion_mnist as fm

        model, _ = fm.trained(device)
        xtr, _ = fm.load("train")
        x_eval, y_eval = fm.load("t10k")
        calib = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))[: args.images]]

        def fmt(s):
            return f"top-1 {s['top1']:6.2f}%  agreement {s['agreement']:6.2f}%"

    else:
        model, data_config = load_model("tf_efficientnet_lite0", device=device)
        recipe = load_recipe("fast")
        folder = default_synth_dir("tf_efficientnet_lite0", data_config, recipe)
        synthesize_set(model, "tf_efficientnet_lite0", data_config, recipe, folder, device=device)
        calib = SyntheticSet(folder).images
        photos = ImageFolder(ROOT / "data" / "samples", data_config)
        x_eval, y_eval = torch.stack([photos[i][0] for i in range(len(photos))]), None

        def fmt(s):
            return f"agreement {s['agreement']:6.2f}%  KL {s['kl']:.4f}  SQNR {s['sqnr_db']:.2f} dB"

    batches = [calib[i : i + 32].to(device) for i in range(0, len(calib), 32)]
    fp = judge(model, model, x_eval, y_eval, device)
    print(f"FP: {fmt(fp)}", flush=True)
    estimators = [TraceEstimator(e) for e in args.estimators.split(",")]
    result = {"model": args.which, "calibration_images": len(calib), "device": device_name(device), "fp": fp}
    result |= {"probes": args.probes}
    result |= run(model, args.which, batches, x_eval, y_eval, device, fmt, estimators, args.probes)
    tag = "" if args.probes == MixedConfig().probes else f"_{args.probes}probes"
    write_result(result, f"mixed_quality_{args.which}{tag}_{device.type}.json", args.out)


if __name__ == "__main__":
    main()
