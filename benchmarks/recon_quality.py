"""Reconstruction quality: round-to-nearest vs AdaRound / BRECQ / QDrop, on real and zero-shot calibration data.

    python benchmarks/recon_quality.py fmnist [--iters 20000] [--device cuda]   # needs dataset-fashion-mnist
    python benchmarks/recon_quality.py lite0  [--iters 20000] [--device cuda]
    python benchmarks/recon_quality.py fmnist --iters 1000 --table   # a results file as the README's table

fmnist: the timm ResNet-18 trained on Fashion-MNIST (`fashion_mnist.py train`, run first if its weights are missing);
top-1 on the 10k test set for W8A8, W4A8, W4A4, W2A4 × {rtn, adaround, brecq, qdrop} × calibration on
{real: 1024 training images, intraq: 1024 synthetic images, fdda: 1024 synthetic + one real image per class}.
lite0: tf_efficientnet_lite0 (real ImageNet weights), zero-shot (intraq), W8A8, W4A8, W4A4 × {rtn, qdrop}; agreement,
KL and logit SQNR against FP on the 66 sample photos.

fmnist synthesizes its IntraQ set at pixel lr 0.1 (`--synth-lr`): at the published 0.5 batches of the 28² model
diverge or stall (docs/synthesis.md); FDDA keeps 0.5.
The bit convention is the project default (`qdrop`: first/last layer weights 8-bit). Synthetic sets are made with the
product's resumable synthesizer and kept in the cache folder; every finished cell is written to the JSON at once and
skipped when the command is rerun, so an interrupted run resumes; runs with different `--methods`/`--settings` may
share the file at the same time. `--iters` sets iterations per unit (published: 20,000); the JSON records it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ptq._io import write_json
from ptq.config import Method, QuantConfig, ReconConfig, SynthConfig, SynthMethod
from ptq.data import ImageFolder
from ptq.models import cache_dir, load_model
from ptq.quant import calibrate, prepare
from ptq.recon.run import reconstruct
from ptq.synth import SyntheticSet, class_statistics, synthesize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from synth_quality import judge  # noqa: E402

METHODS = ("qdrop", "rtn", "brecq", "adaround")


def synthetic(
    model, name, data_config, method, num, batch, device, class_stats=None, iters_scale=1.0, lrs=None
) -> torch.Tensor:
    """A synthetic set made (or resumed, or reused) by the product's synthesizer in the cache folder; `lrs` maps a
    method to its pixel lr where that is not the preset's."""
    preset = SynthConfig(method=method)
    lr = (lrs or {}).get(SynthMethod(method).value)
    iters = max(1, round(preset.iters * iters_scale))
    config = SynthConfig(method=method, num_images=num, batch_size=batch, iters=iters, lr=lr or preset.lr)
    suffix = f"-lr{lr:g}" if lr else ""
    folder = cache_dir() / "bench" / f"{name}-{SynthMethod(method).value}-{num}-x{iters_scale}{suffix}"
    start = time.perf_counter()
    synthesize(model, name, data_config, config, folder, device, class_stats)
    images = SyntheticSet(folder).images
    print(f"  {method}: {num} synthetic images in {folder} ({time.perf_counter() - start:.0f}s)", flush=True)
    return images


def cell(model, calib, w_bits, a_bits, method, recon, device) -> tuple[torch.nn.Module, dict]:
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits)
    batch = recon.batch_size
    batches = [calib[i : i + batch].to(device) for i in range(0, len(calib), batch)]
    qmodel = calibrate(prepare(model, config, batches[0][:1]), batches, config)
    info = {}
    if method is not Method.RTN:
        start = time.perf_counter()
        summary = reconstruct(qmodel, batches, method, recon)
        info = {"recon_seconds": round(time.perf_counter() - start, 1), "cache": summary["cache"]}
    return qmodel, info


def key(row) -> tuple:
    return row["source"], row["w_bits"], row["a_bits"], row["method"]


def save(out, result, row) -> None:
    """Add one finished cell; rows another run has written to the same file meanwhile are kept."""
    on_disk = json.loads(out.read_text())["rows"] if out.is_file() else []
    mine = {key(r) for r in result["rows"]}
    result["rows"] += [r for r in on_disk if key(r) not in mine and key(r) != key(row)]
    result["rows"].append(row)
    write_json(out, result)


def run_grid(result, out, model, sources, settings, methods, recon, device, x, y, fmt):
    for w, a in settings:
        for source, calib in sources.items():
            for m in methods:
                done = {key(r) for r in result["rows"]}
                if out.is_file():
                    done |= {key(r) for r in json.loads(out.read_text())["rows"]}
                if (source, w, a, m) in done:
                    continue
                qmodel, info = cell(model, calib(), w, a, Method(m), recon, device)
                summary = judge(qmodel, model, x, y, device)
                save(out, result, {"source": source, "w_bits": w, "a_bits": a, "method": m, **summary, **info})
                print(f"{source:7s} W{w}A{a} {m:9s} {fmt(summary)}  {info.get('recon_seconds', 0):.0f}s", flush=True)


def recon_config(args) -> ReconConfig:
    return ReconConfig(iters=args.iters, batch_size=args.batch, lr=args.lr)


def lazy(make):
    cached = []

    def get():
        if not cached:
            cached.append(make())
        return cached[0]

    return get


def run_fmnist(args, device, out, result):
    import fashion_mnist as fm

    model, data_config = fm.trained(device)
    xtr, ytr = fm.load("train")
    xte, yte = fm.load("t10k")
    g = torch.Generator().manual_seed(0)
    real = xtr[torch.randperm(len(ytr), generator=g)[:1024]]
    one_per_class = torch.stack([xtr[(ytr == c).nonzero()[0, 0]] for c in range(10)])
    result.setdefault("fp_top1", judge(model, model, xte, yte, device)["top1"])
    print(f"FP top-1 {result['fp_top1']:.2f}%", flush=True)
    name = "resnet18-fmnist"

    def fdda():
        stats = class_statistics(model, one_per_class.to(device), torch.arange(10, device=device))
        images = synthetic(
            model, name, data_config, SynthMethod.FDDA, 1024, 128, device, stats, args.synth_scale, args.synth_lr
        )
        return torch.cat([images, one_per_class])

    def intraq():
        return synthetic(
            model, name, data_config, SynthMethod.INTRAQ, 1024, 128, device, None, args.synth_scale, args.synth_lr
        )

    sources = {
        "intraq": lazy(intraq),
        "real": lambda: real,
        "fdda": lazy(fdda),
    }
    sources = {k: v for k, v in sources.items() if k in args.sources.split(",")}
    settings = args.settings or [(4, 4), (2, 4), (4, 8), (8, 8)]
    run_grid(
        result, out, model, sources, settings, args.methods.split(","), recon_config(args), device, xte, yte,
        lambda s: f"top-1 {s['top1']:6.2f}% (FP {result['fp_top1']:.2f})",
    )  # fmt: skip


def run_lite0(args, device, out, result):
    model, data_config = load_model("tf_efficientnet_lite0", device=device)
    photos = ImageFolder(ROOT / "data" / "samples", data_config)
    x = torch.stack([photos[i][0] for i in range(len(photos))])
    name = "tf_efficientnet_lite0"

    def intraq():
        return synthetic(
            model, name, data_config, SynthMethod.INTRAQ, args.images, 32, device, None, args.synth_scale, args.synth_lr
        )

    def fmt(s):
        return f"agreement {s['agreement']:6.2f}%  KL {s['kl']:.4f}  SQNR {s['sqnr_db']:.2f} dB"

    methods = [m for m in args.methods.split(",") if m in ("rtn", "qdrop")]
    settings = args.settings or [(4, 8), (4, 4), (8, 8)]
    run_grid(result, out, model, {"intraq": lazy(intraq)}, settings, methods, recon_config(args), device, x, None, fmt)


def table(result) -> str:
    """The README's table of a results file: a row per setting and method, a column per calibration source."""
    rows = {key(r): r for r in result["rows"]}
    sources = [s for s in ("real", "intraq", "fdda") if any(k[0] == s for k in rows)]
    settings = sorted({(k[1], k[2]) for k in rows}, key=lambda wa: (-wa[0] - wa[1], -wa[1]))
    fmnist = result["model"] == "fmnist"

    def cell(row):
        if row is None:
            return "—"
        if fmnist:
            return f"{row['top1']:.2f}%"
        return f"{row['agreement']:.1f}% / {row['kl']:.3f} / {row['sqnr_db']:.2f} dB"

    head = ["setting", "method", *sources]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(sources)]
    for w, a in settings:
        for m in METHODS[1:2] + METHODS[:1] + METHODS[2:]:  # rtn first
            cells = [rows.get((s, w, a, m)) for s in sources]
            if any(c is not None for c in cells):
                lines.append(f"| W{w}A{a} | {m} | " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(lines)


DEFAULT_SYNTH_LR = {"fmnist": {"intraq": 0.1}, "lite0": {}}


def synth_lr_arg(text: str) -> dict[str, float]:
    try:
        if "=" not in text:
            return {"all": float(text)}
        pairs = dict(item.split("=") for item in text.split(","))
        if not set(pairs) <= {"intraq", "fdda"}:
            raise ValueError
        return {m: float(v) for m, v in pairs.items()}
    except ValueError:
        message = f"{text!r}: expected an lr like 0.1, or pairs like intraq=0.1,fdda=0.5"
        raise argparse.ArgumentTypeError(message) from None


def settings_arg(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(b) for b in pair.split("/")) for pair in text.split(",")]
        if all(len(p) == 2 for p in pairs):
            return pairs
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: expected W/A pairs like 4/4,2/4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["fmnist", "lite0"])
    parser.add_argument("--iters", type=int, default=20000, help="Reconstruction iterations per unit.")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam lr of the rounding variables (published: 1e-3).")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=256, help="lite0: synthetic calibration images.")
    parser.add_argument("--synth-scale", type=float, default=1.0, help="Multiply the synthesis iterations.")
    parser.add_argument(
        "--synth-lr",
        type=synth_lr_arg,
        default=None,
        help="Adam lr on the synthetic pixels: one value for every method or METHOD=LR pairs (default: fmnist "
        "intraq=0.1, where the published 0.5 diverges on the 28² model; otherwise the method's 0.5).",
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sources", default="intraq,real,fdda")
    parser.add_argument(
        "--settings", type=settings_arg, default=None, help="Comma-separated W/A pairs, e.g. 4/4,2/4 (default: all)."
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--table", action="store_true", help="Print the results file as a Markdown table and exit.")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    synth = ""
    if args.synth_lr is None:
        args.synth_lr = dict(DEFAULT_SYNTH_LR[args.which])
    else:
        synth = "_synthlr" + "-".join(f"{m}{lr:g}" if m != "all" else f"{lr:g}" for m, lr in args.synth_lr.items())
    if "all" in args.synth_lr:
        args.synth_lr = {m: args.synth_lr["all"] for m in ("intraq", "fdda")}
    name = f"recon_quality_{args.which}_{args.iters}it_lr{args.lr:g}{synth}_{device.type}.json"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    result = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    if args.table:
        print(table(result))
        return
    result.update(
        model=args.which, iters_per_unit=args.iters, lr=args.lr, batch=args.batch, synth_scale=args.synth_scale,
        synth_lr={m: args.synth_lr.get(m, SynthConfig().lr) for m in ("intraq", "fdda")},
        torch=torch.__version__,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    )  # fmt: skip
    (run_fmnist if args.which == "fmnist" else run_lite0)(args, device, out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
