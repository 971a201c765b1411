"""Runs under torchrun (two gloo processes on the CPU) give what one process gives: evaluation exactly, synthesis the
same images (and a rerun with another number of processes resumes the set), data-parallel reconstruction the same
result within float tolerance; a killed rank ends the whole job with an error instead of a hang."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import random_checkpoint
from typer.testing import CliRunner

from ptq.cli import app
from ptq.distributed import shard
from ptq.synth import SyntheticSet
from ptq.synth.run import rounds

PTQ = str(Path(sys.executable).parent / "ptq")
runner = CliRunner()


def torchrun(*args, nproc: int = 2, wait: bool = True, ok: bool = True, timeout: int = 120):
    """`torchrun --standalone --nproc-per-node N --no-python ptq ARGS`, one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["--no-python", PTQ, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PTQ_DIST_TIMEOUT": str(timeout)}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture
def one_thread():
    """The reference runs in this process with one thread, as each torchrun worker does: same float sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return {name: random_checkpoint(folder, name) for name in ("test_resnet", "test_efficientnet")}


@pytest.fixture(scope="module")
def labelled_photos(tmp_path_factory, samples_dir):
    """Nine photos in class folders 0/1/2 (so top-1/top-5 are computed)."""
    root = tmp_path_factory.mktemp("labelled")
    for i, p in enumerate(sorted(samples_dir.glob("*.jpg"))[:9]):
        (root / str(i % 3)).mkdir(exist_ok=True)
        shutil.copy(p, root / str(i % 3) / p.name)
    return root


def test_shards_are_contiguous_balanced_and_cover_everything():
    for n in (0, 1, 5, 8, 13):
        for size in (1, 2, 3, 4):
            parts = [shard(n, r, size) for r in range(size)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_centre_rounds_double_and_cover_every_batch():
    assert [list(r) for r in rounds(11, True)] == [[0], [1], [2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [list(r) for r in rounds(5, False)] == [[0, 1, 2, 3, 4]]
    assert rounds(0, True) == []


def test_distributed_evaluation_equals_one_process(tmp_path, checkpoints, labelled_photos, one_thread):
    quantized = []
    for bits in (4, 8):
        out = tmp_path / f"q{bits}"
        args = [
            "quantize",
            "--recipe",
            "rtn",
            "test_resnet",
            "--checkpoint",
            checkpoints["test_resnet"],
            "--bits",
            bits,
        ]
        result = runner.invoke(app, [*map(str, args), "--calib-data", str(labelled_photos), "--out", str(out)])
        assert result.exit_code == 0, result.output
        quantized.append(str(out))
    for specs in (quantized[:1], quantized):  # one model: its batches shared out; two: one model per rank
        args = ["evaluate", *specs, "--data", labelled_photos, "--batch-size", 2, "--device", "cpu"]
        single = runner.invoke(app, [*map(str, args), "--out", str(tmp_path / "one.json"), "--overwrite"])
        assert single.exit_code == 0, single.output
        torchrun(*args, "--out", tmp_path / "two.json", "--overwrite")
        one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
        assert len(one) == len(specs) and one[0]["top1"] is not None and one[0]["agreement"] is not None
        for a, b in zip(one, two, strict=True):
            a.pop("seconds"), b.pop("seconds")
            assert a == b  # counts and float sums alike, bit for bit


def test_distributed_synthesis_makes_the_same_set_and_resumes_with_any_number_of_processes(
    tmp_path, checkpoints, one_thread
):
    args = ["synthesize", "test_efficientnet", "--checkpoint", checkpoints["test_efficientnet"], "--method", "intraq"]
    args += ["--num-images", 11, "--batch-size", 2, "--iters", 4, "--device", "cpu"]
    args += ["--classes", "3,7", "--set", "synth.mdc_lower=0.9"]  # two classes, a band that the centres make active
    two = tmp_path / "two"
    torchrun(*args, "--out", two)
    one = tmp_path / "one"
    result = runner.invoke(app, [*map(str, args), "--out", str(one)])
    assert result.exit_code == 0, result.output
    a, b = SyntheticSet(one), SyntheticSet(two)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.meta["batch_losses"] == b.meta["batch_losses"] and b.meta["processes"] == 2
    assert any(loss["mdc"] > 0 for loss in a.meta["batch_losses"][1:])  # later batches did use the centres
    # interrupted two-process run (two shards and the metadata lost), resumed by one process: the same set
    for name in ("shard_00001.safetensors", "shard_00004.safetensors", "synth.json"):
        (two / name).unlink()
    result = runner.invoke(app, [*map(str, args), "--out", str(two)])
    assert result.exit_code == 0, result.output
    assert "4 of 6 batches resumed" in " ".join(result.output.split())
    assert torch.equal(SyntheticSet(two).images, a.images)


def test_data_parallel_reconstruction_matches_one_process_and_resumes_its_units(
    tmp_path, checkpoints, samples_dir, labelled_photos, one_thread, monkeypatch
):
    args = ["quantize", "--recipe", "rtn", "test_resnet", "--checkpoint", checkpoints["test_resnet"], "--bits", 4]
    args += ["--calib-data", samples_dir, "--eval-data", labelled_photos, "--method", "qdrop", "--device", "cpu"]
    args += ["--set", "recon.keep_prob=1.0", "--set", "calib.num_images=12", "--set", "recon.iters=15"]
    args += ["--set", "recon.batch_size=4"]  # no random drops: the same steps exactly, up to float sums
    result = runner.invoke(app, [*map(str, args), "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    # a one-process run into `two` is interrupted after three units; the two-process rerun continues it
    from ptq.recon import run

    calls, original = [], run.reconstruct_unit

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return original(*a, **kw)

    monkeypatch.setattr(run, "reconstruct_unit", interrupted)
    assert runner.invoke(app, [*map(str, args), "--out", str(tmp_path / "two")]).exit_code == 130
    assert len(list((tmp_path / ".two.recon").iterdir())) == 3
    torchrun(*args, "--out", tmp_path / "two")
    one, two = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("one", "two"))
    assert two["processes"] == 2 and two["reconstruction"]["processes"] == 2
    units = one["reconstruction"]["per_unit"]
    assert sum(u["error"] for u in units) < sum(u["rtn_error"] for u in units)
    assert [u.get("resumed", False) for u in two["reconstruction"]["per_unit"]][:4] == [True] * 3 + [False]
    for a, b in zip(units[3:], two["reconstruction"]["per_unit"][3:], strict=True):
        assert a["unit"] == b["unit"]
        assert b["rtn_error"] == pytest.approx(a["rtn_error"], rel=1e-5)
        assert b["error"] == pytest.approx(a["error"], rel=1e-3)
    assert two["evaluation"]["kl"] == pytest.approx(one["evaluation"]["kl"], rel=1e-3)
    assert not (tmp_path / ".two.recon").exists()  # rank 0 cleaned up its unit checkpoints


def _workers(agent: int) -> list[int]:
    children = Path(f"/proc/{agent}/task/{agent}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker processes through /proc")
def test_a_killed_rank_ends_the_job_with_an_error(tmp_path, checkpoints):
    args = ["synthesize", "test_efficientnet", "--checkpoint", checkpoints["test_efficientnet"], "--method", "bns"]
    job = torchrun(*args, "--num-images", 8, "--batch-size", 2, "--iters", 100000, "--out", tmp_path / "s", wait=False)
    try:
        deadline = time.monotonic() + 120
        while len(_workers(job.pid)) < 2 or not (tmp_path / "s").is_dir():  # both ranks are synthesizing
            assert job.poll() is None and time.monotonic() < deadline, "the job did not start"
            time.sleep(0.2)
        workers = _workers(job.pid)
        os.kill(workers[1], signal.SIGKILL)
        output, _ = job.communicate(timeout=60)  # no hang: the other rank is stopped and the job fails
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "SIGKILL" in output and "rank      : 1" in output
    for pid in workers:  # no rank left behind
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_a_rank_waiting_past_the_timeout_ends_the_job_with_one_clear_line(tmp_path, checkpoints):
    """intraq's first round is one batch: rank 1 waits for rank 0 in the all-reduce of the class centres."""
    args = ["synthesize", "test_efficientnet", "--checkpoint", checkpoints["test_efficientnet"], "--method", "intraq"]
    result = torchrun(*args, "--num-images", 4, "--batch-size", 2, "--iters", 100000, "--out", tmp_path / "s",
                      ok=False, timeout=5)  # fmt: skip
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if line.startswith("error:")]
    assert errors and "waited longer than PTQ_DIST_TIMEOUT=5 s" in errors[0]


def test_bad_input_that_every_rank_meets_after_joining_is_reported_once(tmp_path, checkpoints):
    """The model is loaded (and the images listed) by every rank after the process group is joined: one line, by
    rank 0, not one per rank."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = ["--calib-data", empty, "--out", tmp_path / "q"]
    result = torchrun("quantize", "test_resnet", "--checkpoint", checkpoints["test_resnet"], *out, ok=False)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1 and "no images in" in errors[0], errors
    assert not (tmp_path / "q").exists()


def test_gptq_with_bias_correction_gives_the_same_model_on_two_processes(
    tmp_path, checkpoints, samples_dir, one_thread
):
    """Input statistics are summed over ranks before each layer is rounded: two processes, each on half of the
    images, round every weight as one process does. Each rank's batches here are batches of the one-process run
    (4 of 3 images, 2 per rank), so that the convolutions compute the same layer inputs bit for bit: batches of
    other sizes can make the quantized network's activations differ in the last bit (convolution kernels depend on
    the batch size), and a different input bit can move a GPTQ rounding decision, which later layers then follow.
    Σx·xᵀ itself is summed in float64, where the order of the sum over ranks only moves the last digits."""
    from safetensors.torch import load_file

    args = ["quantize", "--recipe", "rtn",
            "test_efficientnet", "--checkpoint", checkpoints["test_efficientnet"], "--bits", 4,
            "--calib-data", samples_dir, "--method", "gptq", "--set", "quant.bias_correction=empirical",
            "--set", "calib.num_images=12", "--set", "calib.batch_size=3", "--device", "cpu"]  # fmt: skip
    result = runner.invoke(app, [*map(str, args), "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    torchrun(*args, "--out", tmp_path / "two")
    one, two = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:
        if key.endswith(".packed") or key.endswith("zero_point"):
            assert torch.equal(one[key], two[key]), key  # the same integer codes
        else:
            assert torch.allclose(one[key], two[key], rtol=1e-5, atol=1e-6), key
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["processes"] == 2 and report["rounding"]["rounding"] == "gptq"
