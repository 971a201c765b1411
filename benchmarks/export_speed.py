"""Deployed speed, size and accuracy of ptq's ONNX exports against the FP32 ONNX model and the peers' int8 exports.

    python benchmarks/export_speed.py [--models lite0,resnet18] [--peers-python PATH] [--rounds 5] [--recipe gptq]

Per model (tf_efficientnet_lite0 with its real ImageNet weights; resnet18 with seeded random weights, for speed
only), all calibrated on the 66 sample photos:
- FP32: the timm model exported by `torch.onnx.export(dynamo=True)`;
- ptq W8A8 and W7A8-symmetric (`ptq quantize --recipe gptq --export onnx`: GPTQ with bias correction, every conv
  output quantized for integer kernels; 8-bit weights export as uint8 codes, symmetric 7-bit ones as int8 codes
  with zero point 0), and W4A8 for the file size;
- onnxruntime `quantize_static` and NNCF (ONNX backend) on the FP32 file (`peers/export_peers.py`, run in the
  peers' virtualenv).
Every file runs in this onnxruntime with 2 threads, batch 1 and batch 32; the files take turns for `--rounds`
rounds and each latency is the median over rounds (the ratios compare numbers taken minutes apart at most on a
shared machine). Accuracy: top-1 agreement, KL(FP‖Q) and logit SQNR against the FP model on the 66 photos (lite0
only: the random resnet18's agreement means nothing). Integer kernels: QLinearConv nodes in onnxruntime's
optimised graph. Writes benchmarks/results/export_speed_cpu.json and the table between the `export` markers in
README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, update_readme, write_result  # noqa: E402

from ptq.data import ImageFolder  # noqa: E402
from ptq.eval.metrics import MetricSums  # noqa: E402
from ptq.export.onnx import OnnxModel  # noqa: E402
from ptq.models import load_model  # noqa: E402

WORK = ROOT / "benchmarks" / "peers" / "work" / "export"
PHOTOS = ROOT / "data" / "samples"
MODELS = {"lite0": "tf_efficientnet_lite0", "resnet18": "resnet18"}
PTQ_ROWS = {  # name → (label, `ptq quantize` arguments)
    "ptq-w8a8": ("ptq W8A8 (gptq+bc)", ["--bits", "8"]),
    "ptq-w7a8s": (
        "ptq W7A8 symmetric (gptq+bc)",
        ["--w-bits", "7", "--a-bits", "8", "--set", "quant.w_symmetric=true"],
    ),
    "ptq-w4a8": ("ptq W4A8 (gptq+bc)", ["--w-bits", "4", "--a-bits", "8"]),  # for the file size
}
PEER_ROWS = {"ort_static": "onnxruntime quantize_static W8A8", "nncf": "NNCF (ONNX) W8A8"}


def random_resnet18(path: Path) -> Path:
    """Seeded random resnet18 weights with non-trivial BatchNorm statistics, as a checkpoint file."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18")
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def fp32_onnx(model: torch.nn.Module, shape: tuple[int, ...], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(), (torch.zeros(shape),), dynamo=True, input_names=["input"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), optimize=True, verbose=False,
        )  # fmt: skip
    program.save(str(path))


def ptq_export(name: str, args: list[str], checkpoint: Path | None, out: Path) -> float:
    """`ptq quantize ... --export onnx` into `out` (kept and reused on a rerun); returns its wall seconds."""
    if (out / "model.onnx").is_file():
        return json.loads((out / "report.json").read_text()).get("bench_seconds", float("nan"))
    command = [
        str(Path(sys.executable).parent / "ptq"), "quantize", name, *args, "--calib-data",
        str(PHOTOS), "--out", str(out), "--overwrite", "--export", "onnx", "--device", "cpu",
    ]  # fmt: skip
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    (out / "report.json").write_text(json.dumps({**report, "bench_seconds": seconds}, indent=2))
    return seconds


def latency(path: Path, x: np.ndarray, reps: int) -> float:
    model = OnnxModel(path, threads=2)
    for _ in range(2):
        model.run(x)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        model.run(x)
        times.append(time.perf_counter() - start)
    return min(times)


def integer_convs(path: Path, work: Path) -> dict[str, int]:
    import onnx

    optimized = work / f".{path.stem}.optimized.onnx"
    OnnxModel(path, threads=2, optimized_path=optimized)
    ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    optimized.unlink(missing_ok=True)
    return {"QLinearConv": ops["QLinearConv"], "float Conv": ops["Conv"] + ops["FusedConv"]}


def accuracy(path: Path, images: torch.Tensor, fp_logits: torch.Tensor) -> dict:
    sums = MetricSums()
    sums.update(OnnxModel(path, threads=2)(images), fp_logits=fp_logits)
    return sums.summary()


def run_model(key: str, peers_python: Path | None, rounds: int, recipe: str) -> dict:
    name = MODELS[key]
    work = WORK / key
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = random_resnet18(work / "resnet18_random.safetensors") if key == "resnet18" else None
    fp_model, data_config = load_model(name, checkpoint=checkpoint)
    folder = ImageFolder(PHOTOS, data_config)
    images = torch.stack([folder[i][0] for i in range(len(folder))])
    files: dict[str, Path] = {"fp32": work / "fp32.onnx"}
    labels = {"fp32": "FP32"}
    seconds: dict[str, float] = {}
    if not files["fp32"].is_file():
        fp32_onnx(fp_model, (1, *images.shape[1:]), files["fp32"])
    for row, (label, args) in PTQ_ROWS.items():
        seconds[row] = ptq_export(name, [*args, "--recipe", recipe], checkpoint, work / row)
        files[row], labels[row] = (
            work / row / "model.onnx",
            label.replace("gptq+bc", "gptq+bc" if recipe == "gptq" else recipe),
        )
    if peers_python is not None:
        if not (work / "peer_seconds.json").is_file() or not all((work / f"{p}.onnx").is_file() for p in PEER_ROWS):
            np.save(work / "calib.npy", images.numpy())
            out = subprocess.run(
                [str(peers_python), str(ROOT / "benchmarks" / "peers" / "export_peers.py"), str(files["fp32"]),
                 str(work / "calib.npy"), str(work)],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            timed_lines = [ln.split() for ln in out.splitlines() if ln.split()[:1] and ln.split()[0] in PEER_ROWS]
            (work / "peer_seconds.json").write_text(json.dumps({k: float(v) for k, v, *_ in timed_lines}))
        peer_seconds = json.loads((work / "peer_seconds.json").read_text())
        for row, label in PEER_ROWS.items():
            files[row], labels[row], seconds[row] = work / f"{row}.onnx", label, peer_seconds.get(row, float("nan"))
    timed = {row: path for row, path in files.items() if row != "ptq-w4a8"}  # W4A8: for its size
    batches = {1: images[:1].numpy(), 32: images[:32].numpy()}
    samples: dict[tuple[str, int], list[float]] = {(r, b): [] for r in timed for b in batches}
    for _ in range(rounds):
        for b, x in batches.items():
            for row, path in timed.items():
                samples[(row, b)].append(latency(path, x, reps=10 if b == 1 else 2))
    with torch.no_grad():
        fp_logits = fp_model(images)
    rows = {}
    for row, path in files.items():
        entry = {"label": labels[row], "bytes": path.stat().st_size, "seconds": seconds.get(row)}
        entry["size_ratio"] = round(entry["bytes"] / files["fp32"].stat().st_size, 3)
        if row in timed:
            entry["kernels"] = integer_convs(path, work)
            for b in batches:
                entry[f"ms_b{b}"] = round(1000 * statistics.median(samples[(row, b)]), 2)
                entry[f"ratio_b{b}"] = round(entry[f"ms_b{b}"] / (1000 * statistics.median(samples[("fp32", b)])), 3)
        if key == "lite0":
            entry.update(accuracy(path, images, fp_logits))
        rows[row] = entry
    return {"model": name, "weights": "random (seeded)" if checkpoint else "ImageNet", "recipe": recipe, "rows": rows}


def table(result: dict) -> str:
    lines = [
        "| model | export | ms batch 1 (÷ FP32) | ms batch 32 (÷ FP32) | int8 convs | size (÷ FP32) | agreement "
        "| KL(FP‖Q) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model in result["models"].values():
        for row in model["rows"].values():
            speed = [f"{row[f'ms_b{b}']:.1f} ({row[f'ratio_b{b}']:.2f})" if f"ms_b{b}" in row else "—" for b in (1, 32)]
            kernels = row.get("kernels")
            convs = f"{kernels['QLinearConv']} / {kernels['QLinearConv'] + kernels['float Conv']}" if kernels else "—"
            acc = [f"{row['agreement']:.1f}%", f"{row['kl']:.3f}"] if row.get("agreement") is not None else ["—", "—"]
            lines.append(
                f"| {model['model']} | {row['label']} | {speed[0]} | {speed[1]} | {convs} | "
                f"{row['bytes'] / 1e6:.2f} MB ({row['size_ratio']:.2f}) | {acc[0]} | {acc[1]} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lite0,resnet18")
    parser.add_argument("--peers-python", default=None, help="the peers' virtualenv Python (skip the peers without)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--recipe", default="gptq", help="ptq's recipe (the speed does not depend on it)")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    import onnxruntime

    result = {
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "threads": 2,
        "cpu_flags": sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in ("avx2", "avx512f",
                                                                                           "avx512_vnni", "avx_vnni")}),
        "models": {},
    }  # fmt: skip
    path = RESULTS / "export_speed_cpu.json"
    if path.is_file():  # other models' rows stay
        result["models"] = json.loads(path.read_text()).get("models", {})
    peers = Path(args.peers_python) if args.peers_python else None
    for key in args.models.split(","):
        result["models"][key] = run_model(key, peers, args.rounds, args.recipe)
        print(table(result), flush=True)
    write_result(result, "export_speed_cpu.json")
    if not args.no_readme:
        update_readme(table(result), "export")


if __name__ == "__main__":
    main()
