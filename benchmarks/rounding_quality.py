"""4-bit quality per CPU minute: round-to-nearest, bias correction, GPTQ and (warm-started) QDrop, through the
product's own code path (recipe → prepare → calibrate → `ptq.pipeline.round_weights`).

    python benchmarks/rounding_quality.py lite0  --synth-iters 100 --images 64 [--settings 4/8,4/4] [--methods ...]
    python benchmarks/rounding_quality.py lite0  --calib photos              # calibrated on the sample photos
    python benchmarks/rounding_quality.py fmnist --images 256 --synth-iters 500   # needs dataset-fashion-mnist
    python benchmarks/rounding_quality.py lite0 --table                      # print a results file as a table

lite0: tf_efficientnet_lite0 (real ImageNet weights) judged against FP on the 66 sample photos (agreement, KL(FP‖Q),
logit SQNR); calibration on IntraQ images synthesized at pixel lr 0.1 by the product's resumable synthesizer (kept
in the cache folder), or on the sample photos themselves (`--calib photos`). fmnist: the timm ResNet-18 trained on
Fashion-MNIST (`fashion_mnist.py train`), top-1 on the 10k test set.

Each method is a list of recipe overrides (see METHODS; `--extra NAME=key=value;key=value` adds one). Times are the
method's own stage (layer-wise pass and/or reconstruction) in wall seconds and process CPU seconds, after
calibration, which every method shares. Every finished cell is written to the JSON at once and skipped when the
command is rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from ptq.calibration import default_synth_dir
from ptq.config import load_recipe
from ptq.data import ImageFolder
from ptq.mixed import Budget
from ptq.models import load_model, weights_digest
from ptq.pipeline import mixed_bits, round_weights
from ptq.quant import calibrate, prepare
from ptq.synth import SyntheticSet, synthesize
from ptq.synth.shards import META_FILE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, device_name, write_result  # noqa: E402
from synth_quality import judge  # noqa: E402

BC = "quant.bias_correction=empirical"
ABC = "quant.bias_correction=analytic"
SHORT = ["recon.lr=0.01", "recon.batch_size=32"]  # short-run reconstruction settings for a CPU
METHODS: dict[str, list[str]] = {
    "default": [],  # the recipe `ptq quantize` uses without --recipe (fast), as shipped
    "rtn": [],
    "rtn+bc": [BC],
    "rtn+abc": [ABC],
    "gptq": ["method=gptq"],
    "gptq+bc": ["method=gptq", BC],
    "gptq+abc": ["method=gptq", ABC],
    "cle+gptq+bc": ["method=gptq", BC, "quant.equalize=true"],
    "qdrop-200": ["method=qdrop", "recon.iters=200", *SHORT],
    "gptq+bc>qdrop-200": ["method=qdrop", "recon.init=gptq", BC, "recon.iters=200", *SHORT],
    "gptq+bc>qdrop-100": ["method=qdrop", "recon.init=gptq", BC, "recon.iters=100", *SHORT],
    "gptq+bc damp 0.1": ["method=gptq", BC, "gptq.damp=0.1"],
    "gptq+bc damp 0.3": ["method=gptq", BC, "gptq.damp=0.3"],
    "gptq+abc damp 0.03": ["method=gptq", ABC, "gptq.damp=0.03"],
    "gptq+abc damp 0.1": ["method=gptq", ABC, "gptq.damp=0.1"],
    "gptq+abc damp 0.3": ["method=gptq", ABC, "gptq.damp=0.3"],
    "gptq+abc damp 1.0": ["method=gptq", ABC, "gptq.damp=1.0"],
    "gptq+bc minmax grid": ["method=gptq", BC, "quant.w_observer=minmax"],
    "gptq+bc+search": ["method=qdrop", "recon.init=gptq", BC, "recon.iters=0", "recon.act_search=true"],
    "gptq+bc+search>qdrop-100": [
        "method=qdrop",
        "recon.init=gptq",
        BC,
        "recon.iters=100",
        "recon.act_search=true",
        *SHORT,
    ],
}


def photos(data_config) -> torch.Tensor:
    folder = ImageFolder(ROOT / "data" / "samples", data_config)
    return torch.stack([folder[i][0] for i in range(len(folder))])


def synthetic_set(model, name, data_config, images, iters, lr, device, batch=32) -> tuple[torch.Tensor, str]:
    """The first `images` of the set `ptq quantize --zero-shot` would use with these synthesis settings (the same
    cache folder: made, grown or reused as the command does)."""
    recipe = load_recipe("rtn", [f"synth.iters={iters}", f"synth.lr={lr}", f"synth.batch_size={batch}"])
    folder = default_synth_dir(name, data_config, recipe, weights_digest(model))
    have = len(SyntheticSet(folder)) if (folder / META_FILE).is_file() else 0
    if have < images:
        config = dataclasses.replace(recipe.synth, num_images=images)
        synthesize(model, name, data_config, config, folder, device)
    return SyntheticSet(folder).images[:images], str(folder)


def cell(
    model, calib, overrides, batch, device, name=None, recipe="rtn", synthetic=False
) -> tuple[torch.nn.Module, dict]:
    """One quantized model made the way `ptq quantize` makes it, from `recipe` (`rtn`, or `fast` for the default)
    with `overrides` (bits included); `name` is the timm name, needed for mixed precision; `synthetic`: `calib` is
    a synthetic set (what `quant.bias_correction=auto` chooses by). Times the method's own
    stage: the sensitivity pass of mixed precision, the layer-wise pass and reconstruction (calibration, which all
    share, is left out)."""
    recipe = load_recipe(recipe, overrides)
    batches = [calib[i : i + batch].to(device) for i in range(0, len(calib), batch)]
    qmodel = prepare(model, recipe.quant, batches[0][:1])
    wall, cpu = time.perf_counter(), time.process_time()
    if recipe.mixed.enabled:
        mixed_bits(qmodel, batches, name, recipe, Budget.from_config(recipe.mixed))
    calib_time, calib_cpu = time.perf_counter(), time.process_time()
    calibrate(qmodel, batches, recipe.quant)
    calib_time, calib_cpu = time.perf_counter() - calib_time, time.process_time() - calib_cpu
    rounding, recon = round_weights(qmodel, model, batches, recipe, synthetic=synthetic)
    info = {
        "seconds": round(time.perf_counter() - wall - calib_time, 1),
        "cpu_seconds": round(time.process_time() - cpu - calib_cpu, 1),
    }
    if rounding is not None:
        info["rounding_error"] = [sum(r.get(k, 0.0) for r in rounding["per_layer"]) for k in ("rtn_error", "error")]
    return qmodel, info


def table(result: dict) -> str:
    lines = ["| setting | method | agreement / KL / SQNR | top-1 | seconds (wall / CPU) |", "|---|---|---:|---:|---:|"]
    for r in sorted(result["rows"], key=lambda r: (-r["w_bits"], -r["a_bits"], list(METHODS).index(r["method"])
                                                   if r["method"] in METHODS else 99)):  # fmt: skip
        top1 = f"{r['top1']:.2f}%" if r.get("top1") is not None else "—"
        lines.append(
            f"| W{r['w_bits']}A{r['a_bits']} | {r['method']} | {r['agreement']:.1f}% / {r['kl']:.3f} / "
            f"{r['sqnr_db']:.2f} dB | {top1} | {r['seconds']:.0f} / {r['cpu_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["lite0", "fmnist"])
    parser.add_argument("--calib", choices=["synthetic", "photos", "real"], default="synthetic")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--synth-iters", type=int, default=100)
    parser.add_argument("--synth-lr", type=float, default=0.1)
    parser.add_argument("--synth-batch", type=int, default=32)
    parser.add_argument("--settings", default="4/8,4/4")
    parser.add_argument("--methods", default="rtn,rtn+bc,gptq,gptq+bc")
    parser.add_argument("--extra", action="append", default=[], help="NAME=key=value;key=value")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    for spec in args.extra:
        name, _, sets = spec.partition("=")
        METHODS[name] = [s for s in sets.split(";") if s]
    source = args.calib if args.calib != "synthetic" else f"intraq{args.images}-it{args.synth_iters}"
    out = Path(args.out) if args.out else RESULTS / f"rounding_quality_{args.model}_{source}_{device.type}.json"
    if args.table:
        print(table(json.loads(out.read_text())))
        return
    if args.model == "lite0":
        name = "tf_efficientnet_lite0"
        model, data_config = load_model(name, device=device)
        x, y = photos(data_config), None
    else:
        import fashion_mnist

        name = "resnet18"
        model, data_config = fashion_mnist.trained(device)
        x, y = fashion_mnist.load("t10k")
    if args.calib == "synthetic":
        calib, folder = synthetic_set(
            model, name, data_config, args.images, args.synth_iters, args.synth_lr, device, args.synth_batch
        )
    elif args.calib == "photos":
        calib, folder = photos(data_config), "data/samples"
    else:
        import fashion_mnist

        calib, folder = fashion_mnist.load("train")[0][: args.images], "Fashion-MNIST training images"
    result = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    result.update(model=name, calibration=folder, images=len(calib), device=device_name(device))
    result["methods"] = {k: v for k, v in METHODS.items()}
    fp = judge(model, model, x, y, device)
    result["fp"] = {"top1": fp.get("top1")}
    for setting in args.settings.split(","):
        w, a = map(int, setting.split("/"))
        for method in args.methods.split(","):
            done = {(r["w_bits"], r["a_bits"], r["method"]) for r in result["rows"]}
            if (w, a, method) in done:
                continue
            overrides = [f"quant.w_bits={w}", f"quant.a_bits={a}", *METHODS[method]]
            recipe = "fast" if method == "default" else "rtn"
            qmodel, info = cell(model, calib, overrides, args.batch, device, name, recipe, args.calib == "synthetic")
            summary = judge(qmodel, model, x, y, device)
            result["rows"].append({"w_bits": w, "a_bits": a, "method": method, **summary, **info})
            write_result(result, out.name, str(out))
            top1 = f" top-1 {summary['top1']:.2f}%" if summary.get("top1") is not None else ""
            print(f"W{w}A{a} {method:22s} agreement {summary['agreement']:.1f}% KL {summary['kl']:.4f} "
                  f"SQNR {summary['sqnr_db']:.2f} dB{top1}  {info['seconds']:.0f}s", flush=True)  # fmt: skip
    print(table(result))


if __name__ == "__main__":
    main()
