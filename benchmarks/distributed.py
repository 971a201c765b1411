"""One process vs N under torchrun: wall time and per-rank peak memory of `ptq evaluate` and `ptq synthesize`.

    python benchmarks/distributed.py [--nproc 2] [--device cpu|cuda] [--images 528] [--synth-batches 8]

Each job runs as the user would run it — `ptq ...` alone, then `torchrun --standalone --nproc-per-node N --no-python
ptq ...` — through a small wrapper that records, per rank, the command's own time and the process's peak resident
memory (CPU) or peak allocated GPU memory. Jobs (tf_efficientnet_lite0/1, offline weights):
- evaluate, one model: the W8A8 output of lite0 against its FP parent on the sample photos repeated to `--images`
  (each rank evaluates its share of the batches);
- evaluate, two models: lite0 and lite1 FP (one model per rank);
- synthesize bns and intraq: `--synth-batches` batches of 4 images, 20 iterations each (intraq's batches wait for
  the class centres of earlier rounds, so at most 1, 1, 2, 4, ... batches run at once);
- quantize lite0 W4A4 with qdrop on 64 of the photos, `--recon-iters` per unit, batch 16 (data-parallel
  reconstruction: each rank caches its half of every unit).
On a CPU, one process uses every core (torch threads) while N processes get one thread each (torchrun's default),
so the ratio shows what splitting the cores between processes buys, not what N machines would; a third run, one
process with one thread, gives the per-core scaling (N processes vs one the size of one rank). The JSON records
every time and the ratios one-process ÷ N-process (above 1: faster with N).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def worker(args: list[str]) -> None:
    """Run `ptq ARGS` in this process (as one torchrun rank) and write its time and peak memory."""
    import torch

    from ptq.cli import main

    start = time.perf_counter()
    sys.argv = ["ptq", *args]
    try:
        main()
    except SystemExit as e:
        if e.code:
            raise
    rank = int(os.environ.get("RANK", 0))
    record = {
        "rank": rank,
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
    }
    Path(os.environ["PTQ_BENCH_RECORD"], f"rank{rank}.json").write_text(json.dumps(record))


def launch(nproc: int, args: list[str], records: Path, threads: int | None = None) -> dict:
    shutil.rmtree(records, ignore_errors=True)
    records.mkdir(parents=True)
    command = [sys.executable, __file__, "_worker", *args]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   *command[1:]]  # fmt: skip
    env = {**os.environ, "PTQ_BENCH_RECORD": str(records), "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(records.glob("rank*.json"))]
    return {"processes": nproc, "wall_s": round(wall, 2), "ranks": ranks}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=528, help="Evaluation images (the sample photos repeated).")
    parser.add_argument("--synth-batches", type=int, default=8)
    parser.add_argument("--recon-iters", type=int, default=20, help="Reconstruction iterations per unit.")
    parser.add_argument("--only", default=None, help="Run the jobs whose name contains this; keep the other rows.")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch
    from common import RESULTS, device_name, write_result

    work = Path(tempfile.mkdtemp(prefix="ptq-dist-bench-"))
    photos = sorted((ROOT / "data" / "samples").glob("*.jpg"))
    data = work / "photos"
    data.mkdir()
    for i in range(args.images):
        (data / f"{i:05d}{photos[i % len(photos)].suffix}").symlink_to(photos[i % len(photos)])
    dev = ["--device", args.device]
    quantized = work / "lite0-w8a8"
    subprocess.run(
        [sys.executable, "-m", "ptq.cli", "quantize", "tf_efficientnet_lite0", "--bits", "8", "--calib-data",
         str(ROOT / "data" / "samples"), "--out", str(quantized), *dev],
        check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    jobs = {
        "evaluate lite0 W8A8 vs FP": ["evaluate", str(quantized), "--data", str(data), "--batch-size", "16", *dev],
        "evaluate lite0 + lite1 FP": [
            "evaluate", "tf_efficientnet_lite0", "tf_efficientnet_lite1", "--data", str(data), "--batch-size", "16",
            *dev,
        ],
    }  # fmt: skip
    for method in ("bns", "intraq"):
        jobs[f"synthesize {method}"] = [
            "synthesize", "tf_efficientnet_lite0", "--method", method, "--num-images", str(4 * args.synth_batches),
            "--batch-size", "4", "--iters", "20", "--out", str(work / f"synth-{method}"), "--overwrite", *dev,
        ]  # fmt: skip
    jobs["quantize lite0 W4A4 qdrop (reconstruction)"] = [
        "quantize", "tf_efficientnet_lite0", "--bits", "4", "--calib-data", str(ROOT / "data" / "samples"),
        "--method", "qdrop", "--set", "calib.num_images=64", "--set", f"recon.iters={args.recon_iters}",
        "--set", "recon.batch_size=16", "--out", str(work / "lite0-w4a4-qdrop"), "--overwrite", *dev,
    ]  # fmt: skip
    device = torch.device(args.device)
    file_name = f"distributed_{args.nproc}proc_{device.type}.json"
    previous = Path(args.out) if args.out else RESULTS / file_name
    kept = json.loads(previous.read_text())["rows"] if args.only and previous.is_file() else []
    jobs = {k: v for k, v in jobs.items() if not args.only or args.only in k}
    rows = [r for r in kept if r["job"] not in jobs]
    for name, job in jobs.items():
        runs = []
        for nproc, threads in ((1, None), (1, 1), (args.nproc, None)):
            if job[0] == "synthesize":  # made anew each time
                shutil.rmtree(job[job.index("--out") + 1], ignore_errors=True)
            runs.append(launch(nproc, job, work / "records", threads))
            if job[0] == "quantize":  # the stages' times and the per-rank reconstruction cache
                report = json.loads((Path(job[job.index("--out") + 1]) / "report.json").read_text())
                runs[-1] |= {"timings_s": report["timings_s"], "cache": report["reconstruction"]["cache"]}
        one, one_thread, many = runs
        row = {
            "job": name,
            "one": one,
            "one_thread": one_thread,
            "many": many,
            "wall_ratio": round(one["wall_s"] / many["wall_s"], 3),
            "wall_ratio_vs_one_thread": round(one_thread["wall_s"] / many["wall_s"], 3),
            "command_ratio": round(one["ranks"][0]["seconds"] / max(r["seconds"] for r in many["ranks"]), 3),
        }
        rows.append(row)
        rss = ", ".join(f"{r['peak_rss_mb']:.0f}" for r in many["ranks"])
        print(
            f"{name}: 1 process {one['wall_s']:.1f}s ({one['ranks'][0]['peak_rss_mb']:.0f} MB), 1 process 1 thread "
            f"{one_thread['wall_s']:.1f}s, {args.nproc} processes {many['wall_s']:.1f}s ({rss} MB per rank); "
            f"ratio {row['wall_ratio']:.2f} (vs 1 thread {row['wall_ratio_vs_one_thread']:.2f})",
            flush=True,
        )
    shutil.rmtree(work, ignore_errors=True)
    result = {"device": device_name(device), "cpus": os.cpu_count(), "torch": torch.__version__, "rows": rows}
    write_result(result, previous.name, args.out)


if __name__ == "__main__":
    main()
