"""ptq vs the toolkits a user would pick instead, on the same model, the same images and the same metrics.

    python benchmarks/peers/run.py [--rows ROW,...] [--peers-python PATH] [--no-readme]

Run with ptq's Python. The peers (Sony MCT, NNCF, onnxruntime's `quantize_static`) run in their own virtualenv,
`benchmarks/peers/.venv`, made from `benchmarks/peers/requirements.txt` on first use (or `--peers-python`), one
process per row (`peer_rows.py`); they are never a dependency of ptq.

Model: tf_efficientnet_lite0 (real ImageNet weights). Evaluation: top-1 agreement with FP, KL(FP‖Q) and logit SQNR
on the 66 sample photos, computed by ptq's own metrics from every row's logits. Calibration: the same photos
(`photos`), or zero-shot — ptq's synthetic images for ptq, MCT's own data generation for MCT. Time: wall and process
CPU seconds of each toolkit's own work from the FP model to the quantized one on this machine (ptq zero-shot rows
add the wall time of synthesizing their set, as recorded when it was made, to the wall column only). Weight bytes:
the packed integer weights at each layer's width (no scales), as the mixed-precision budget counts them.

Writes `benchmarks/results/peers_lite0_cpu.json` and the table between the `peers` markers in README.md. Each
finished row is kept in the JSON and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, device_name, update_readme, write_result  # noqa: E402
from rounding_quality import cell, photos, synthetic_set  # noqa: E402

from ptq.eval.metrics import MetricSums  # noqa: E402
from ptq.models import lite_weights, load_model  # noqa: E402
from ptq.quant.modules import quant_layers  # noqa: E402

MODEL = "tf_efficientnet_lite0"
VENV = HERE / ".venv"
WORK = HERE / "work"
BC = "quant.bias_correction=empirical"
GPTQ = ["method=gptq", BC]
# zero-shot images for ptq rows: the default recipe's synthesis settings
SYNTH = {"images": 64, "iters": 100, "lr": 0.1}

# name → (toolkit, setting, calibration, what to run): ptq rows are recipe overrides, peer rows `peer_rows.py` rows
ROWS: dict[str, tuple[str, str, str, object]] = {
    "ptq-rtn-w8a8": ("ptq rtn", "W8A8", "photos", ["quant.w_bits=8", "quant.a_bits=8"]),
    "ptq-gptq-w8a8": ("ptq gptq+bc", "W8A8", "photos", ["quant.w_bits=8", "quant.a_bits=8", *GPTQ]),
    "mct-ptq-w8a8": ("MCT PTQ", "W8A8", "photos", "mct-ptq:w=8,a=8"),
    "nncf-w8a8": ("NNCF", "W8A8", "photos", "nncf:"),
    "ort-w8a8": ("onnxruntime quantize_static", "W8A8", "photos", "ort:"),
    "ptq-gptq-w4a8": ("ptq gptq+bc", "W4A8", "photos", ["quant.w_bits=4", "quant.a_bits=8", *GPTQ]),
    "ptq-gptq-w4a8-all": ("ptq gptq+bc, all layers 4-bit", "W4A8", "photos",
                          ["quant.w_bits=4", "quant.a_bits=8", "quant.first_last_bits=all", *GPTQ]),
    "mct-ptq-w4a8": ("MCT PTQ, all layers 4-bit", "W4A8", "photos", "mct-ptq:w=4,a=8"),
    "mct-gptq-w4a8": ("MCT GPTQ (gradient, 2 epochs, no Hessian weights), all layers 4-bit", "W4A8", "photos",
                      "mct-gptq:w=4,a=8,epochs=2,hessian=0"),
    "ptq-gptq-w4a4": ("ptq gptq+bc", "W4A4", "photos", ["quant.w_bits=4", "quant.a_bits=4", *GPTQ]),
    "mct-ptq-w4a4": ("MCT PTQ, all layers 4-bit", "W4A4", "photos", "mct-ptq:w=4,a=4"),
    "ptq-mixed": ("ptq mixed precision + gptq+bc", "W-mixed A8", "photos",
                  ["quant.a_bits=8", "mixed.enabled=true", "quant.w_bits=8", "mixed.size_budget=BYTES", *GPTQ]),
    "mct-mixed": ("MCT mixed precision", "W-mixed A8", "photos", "mct-mixed:bytes=BYTES"),
    "ptq-zs-w4a8": ("ptq zero-shot gptq+bc", "W4A8", "zero-shot", ["quant.w_bits=4", "quant.a_bits=8", *GPTQ]),
    "ptq-zs-w4a8-abc": ("ptq zero-shot gptq + analytic bias correction", "W4A8", "zero-shot",
                        ["quant.w_bits=4", "quant.a_bits=8", "method=gptq", "quant.bias_correction=analytic"]),
    "ptq-zs-w4a8-abc-all": ("ptq zero-shot gptq + analytic bias correction, all layers 4-bit", "W4A8", "zero-shot",
                            ["quant.w_bits=4", "quant.a_bits=8", "quant.first_last_bits=all", "method=gptq",
                             "quant.bias_correction=analytic"]),
    "ptq-zs-w4a4": ("ptq zero-shot gptq+bc (the default recipe)", "W4A4", "zero-shot",
                    ["quant.w_bits=4", "quant.a_bits=4", *GPTQ]),
    # MCT's data generation runs about 8 s per iteration of a 32-image batch here: 24 iterations for 64 images take
    # about the time ptq's synthesis of its set takes (100 iterations)
    "mct-zs-w4a8": ("MCT zero-shot (its data generation, 24 it, ptq's synthesis time) + PTQ, all layers 4-bit",
                    "W4A8", "zero-shot", "mct-zero-shot:w=4,a=8,images=64,iters=24"),
}  # fmt: skip


def peers_python(given: str | None) -> Path:
    if given:
        return Path(given)
    python = VENV / "bin" / "python"
    if not python.is_file():
        print(f"making the peers' virtualenv in {VENV} (once; several GB with torch)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(HERE / "requirements.txt")], check=True)
    return python


def weight_bytes(qmodel) -> int:
    """Packed integer weights at each layer's width (what MCT's weights-memory budget counts)."""
    return sum(layer.weight.numel() * layer.weight_quantizer.bits // 8 for layer in quant_layers(qmodel).values())


def metrics(logits: torch.Tensor, fp: torch.Tensor) -> dict:
    sums = MetricSums()
    sums.update(logits, fp_logits=fp)
    return sums.summary()


def table(result: dict) -> str:
    lines = [
        "| setting | calibration | toolkit and method | agreement | KL(FP‖Q) | SQNR | weights | seconds (wall / CPU) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in ROWS:
        r = result["rows"].get(name)
        if r is None:
            continue
        size = f"{r['weight_bytes'] / 1e6:.2f} MB" if r.get("weight_bytes") else "—"
        lines.append(
            f"| {r['setting']} | {r['calibration']} | {r['toolkit']} | {r['agreement']:.1f}% | {r['kl']:.3f} | "
            f"{r['sqnr_db']:.2f} dB | {size} | {r['seconds']:.0f} / {r['cpu_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--peers-python", default=None)
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out) if args.out else RESULTS / "peers_lite0_cpu.json"
    result = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    model, data_config = load_model(MODEL)
    x = photos(data_config)
    synthetic, folder = synthetic_set(model, MODEL, data_config, SYNTH["images"], SYNTH["iters"], SYNTH["lr"], "cpu")
    meta = json.loads((Path(folder) / "synth.json").read_text())
    if meta["num_images"] == SYNTH["images"]:  # the time of making exactly the set the rows use
        result["synth_seconds"] = meta["seconds"]
    # a set since grown (another benchmark asked the cache for more images) keeps the time first recorded
    synth_seconds = result.get("synth_seconds") or next(
        (r["synth_seconds"] for r in result["rows"].values() if "synth_seconds" in r),
        meta["seconds"] * SYNTH["images"] / meta["num_images"],
    )
    with torch.no_grad():
        fp = model(x)
    result.update(model=MODEL, eval_images=len(x), device=device_name(torch.device("cpu")), synthetic=folder,
                  threads=torch.get_num_threads())  # fmt: skip
    WORK.mkdir(exist_ok=True)
    bundle = WORK / "bundle.pt"
    torch.save({"model": MODEL, "num_classes": 1000, "weights": str(lite_weights(MODEL)),
                "input_size": tuple(data_config["input_size"]), "calib": x, "eval": x, "synthetic": synthetic},
               bundle)  # fmt: skip
    # the mixed-precision budget: the weight bytes of ptq's uniform W4 model (first and last layer at 8 bits)
    w4 = cell(model, x[:2], ["quant.w_bits=4", "quant.a_bits=8"], 32, "cpu")[0]
    budget = weight_bytes(w4)
    result["mixed_budget_bytes"] = budget
    python = None
    for name in args.rows.split(","):
        if name in result["rows"]:
            continue
        toolkit, setting, calibration, what = ROWS[name]
        row = {"toolkit": toolkit, "setting": setting, "calibration": calibration}
        if isinstance(what, list):
            calib = synthetic if calibration == "zero-shot" else x
            overrides = [o.replace("BYTES", str(budget)) for o in what]
            qmodel, info = cell(model, calib, overrides, 32, "cpu", MODEL, synthetic=calibration == "zero-shot")
            with torch.no_grad():
                logits = qmodel(x)
            if calibration == "zero-shot":
                info["synth_seconds"] = synth_seconds
                info["seconds"] = round(info["seconds"] + synth_seconds, 1)
            row.update(info, weight_bytes=weight_bytes(qmodel))
        else:
            python = python or peers_python(args.peers_python)
            path = WORK / f"{name}.pt"
            env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
            start = time.perf_counter()
            spec = what.replace("BYTES", str(budget)) + (",calib=synthetic" if calibration == "zero-shot" else "")
            done = subprocess.run([str(python), str(HERE / "peer_rows.py"), str(bundle), spec, str(path)],
                                  env=env, cwd=WORK)  # fmt: skip
            if done.returncode != 0:
                print(f"{name}: failed (exit {done.returncode}; its traceback is above); going on", flush=True)
                continue
            saved = torch.load(path, weights_only=False)
            logits = saved["logits"]
            row.update({k: saved[k] for k in ("seconds", "cpu_seconds", "data_seconds") if k in saved})
            row["process_seconds"] = round(time.perf_counter() - start, 1)
            params = dict(p.split("=") for p in spec.partition(":")[2].split(",") if p)
            numel = sum(layer.weight.numel() for layer in quant_layers(w4).values())
            row["weight_bytes"] = budget if "bytes" in params else numel * int(params.get("w", 8)) // 8
        row.update(metrics(logits, fp))
        result["rows"][name] = row
        write_result(result, out.name, str(out))
        print(f"{name}: {row['agreement']:.1f}% / KL {row['kl']:.4f} / {row['sqnr_db']:.2f} dB, {row['seconds']}s",
              flush=True)  # fmt: skip
    text = table(result)
    print(text)
    if not args.no_readme:
        update_readme(text, "peers")


if __name__ == "__main__":
    main()
