"""How good is zero-shot calibration data? Round-to-nearest PTQ calibrated on synthetic images of each method, on
random noise, and on real images, judged on real data.

    python benchmarks/synth_quality.py lite0  [--device cuda] [--iters-scale 1.0]
    python benchmarks/synth_quality.py fmnist [--device cuda] [--iters-scale 1.0]   # needs dataset-fashion-mnist

lite0: tf_efficientnet_lite0 (real ImageNet weights), W8A8, 256 calibration images per source; judged by top-1
agreement, KL(FP‖Q) and logit SQNR against FP on the 66 sample photos.
fmnist: a timm ResNet-18 trained on Fashion-MNIST (`fashion_mnist.py train`, run first if its weights are missing);
W8A8, W4A8 and W8A4; 256 images per source (real: training images); judged by top-1 on the 10k test set.
FDDA uses a few real images (lite0: the 11 sample photos; fmnist: one training image per class) and, as the method
prescribes, calibrates on them together with its synthetic images. Writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from ptq.config import QuantConfig, SynthConfig
from ptq.data import ImageFolder
from ptq.eval.metrics import MetricSums
from ptq.models import load_model
from ptq.quant import calibrate, prepare
from ptq.synth import SyntheticSet, class_statistics, synthesize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
METHODS = ("bns", "intraq", "fdda", "genie")


def synthetic(model, data_config, method, num, batch, device, iters_scale, class_stats, seed=0):
    """A set made by the product's own resumable synthesizer (`ptq.synth.synthesize`, as `ptq synthesize` runs
    it), in a temporary folder."""
    preset = SynthConfig(method=method)
    config = SynthConfig(
        method=method, num_images=num, batch_size=batch, seed=seed, iters=max(1, round(preset.iters * iters_scale))
    )
    with tempfile.TemporaryDirectory() as tmp:
        meta = synthesize(model, "benchmark", data_config, config, tmp, device, class_stats)
        images = SyntheticSet(tmp).images.clone()
    return images, {"iters": config.iters, "seconds": meta["seconds"], "final_loss": meta["batch_losses"][-1]}


def quantized(model, calib: torch.Tensor, w_bits: int, a_bits: int, device, batch: int = 64):
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits)
    qmodel = prepare(model, config, calib[:1].to(device))
    return calibrate(qmodel, [calib[i : i + batch].to(device) for i in range(0, len(calib), batch)], config)


@torch.no_grad()
def judge(qmodel, model, x, y, device, batch: int = 500) -> dict:
    sums = MetricSums()
    for i in range(0, len(x), batch):
        xb = x[i : i + batch].to(device)
        sums.update(qmodel(xb), None if y is None else y[i : i + batch].to(device), model(xb))
    return sums.summary()


def sources(model, data_config, real_calib, real_fdda, fdda_labels, device, iters_scale, batch, methods=METHODS):
    """Calibration sets: real, noise, and each synthesis method (FDDA joined by its real images)."""
    num = real_calib.shape[0]
    out = {"real": (real_calib, {}), "noise": (torch.randn(num, *data_config["input_size"]), {})}
    stats = class_statistics(model, real_fdda.to(device), None if fdda_labels is None else fdda_labels.to(device))
    for method in methods:
        images, info = synthetic(model, data_config, method, num, batch, device, iters_scale, stats)
        if method == "fdda":
            images = torch.cat([images, real_fdda])
        out[method] = (images, info)
        print(f"  synthesized {method}: {info}", flush=True)
    return out


def run_lite0(device, iters_scale, batch, methods):
    model, data_config = load_model("tf_efficientnet_lite0", device=device)
    photos = ImageFolder(ROOT / "data" / "samples", data_config)
    x = torch.stack([photos[i][0] for i in range(len(photos))])
    full = torch.stack([photos[i][0] for i, p in enumerate(photos.images) if p.stem.endswith("_full")])
    real = x[torch.arange(256) % len(x)]  # the 66 photos, repeated to 256
    rows = []
    for name, (calib, info) in sources(
        model, data_config, real, full, None, device, iters_scale, batch, methods
    ).items():
        summary = judge(quantized(model, calib, 8, 8, device), model, x, None, device)
        rows.append({"source": name, "w_bits": 8, "a_bits": 8, **summary, **info})
        print(
            f"{name:8s} W8A8 agreement {summary['agreement']:6.2f}%  KL {summary['kl']:.4f}  "
            f"SQNR {summary['sqnr_db']:.2f} dB",
            flush=True,
        )
    return {"model": "tf_efficientnet_lite0", "judged_on": "data/samples (66 photos)", "rows": rows}


def run_fmnist(device, iters_scale, batch, methods):
    import fashion_mnist as fm

    model, data_config = fm.trained(device)
    xtr, ytr = fm.load("train")
    xte, yte = fm.load("t10k")
    g = torch.Generator().manual_seed(0)
    real = xtr[torch.randperm(len(ytr), generator=g)[:256]]
    one_per_class = torch.stack([xtr[(ytr == c).nonzero()[0, 0]] for c in range(10)])
    fp_top1 = judge(model, model, xte, yte, device)["top1"]
    print(f"FP top-1 {fp_top1:.2f}%", flush=True)
    rows = []
    for name, (calib, info) in sources(
        model, data_config, real, one_per_class, torch.arange(10), device, iters_scale, batch
    ).items():
        for w, a in ((8, 8), (4, 8)):
            summary = judge(quantized(model, calib, w, a, device), model, xte, yte, device)
            rows.append({"source": name, "w_bits": w, "a_bits": a, **summary, **info})
            print(
                f"{name:8s} W{w}A{a} top-1 {summary['top1']:.2f}% (FP {fp_top1:.2f})  agreement "
                f"{summary['agreement']:.2f}%",
                flush=True,
            )
    return {"model": "resnet18 trained on Fashion-MNIST", "fp_top1": fp_top1, "judged_on": "10k test set", "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["lite0", "fmnist"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters-scale", type=float, default=1.0, help="Multiply each method's published iterations.")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    methods = tuple(args.methods.split(","))
    result = (run_lite0 if args.which == "lite0" else run_fmnist)(args.device, args.iters_scale, args.batch, methods)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    result.update(device=device_name, iters_scale=args.iters_scale, batch=args.batch, torch=torch.__version__)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"synth_quality_{args.which}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
