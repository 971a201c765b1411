"""The command line as a user meets it: the main job, the evaluation harness, and every bad-input case."""

import json

import pytest
import timm
import torch
import yaml
from conftest import random_checkpoint
from typer.testing import CliRunner

from ptq.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("ckpt"), "test_resnet")


@pytest.fixture(scope="module")
def few_photos(tmp_path_factory, samples_dir):
    folder = tmp_path_factory.mktemp("photos") / "nested"
    folder.mkdir()
    for p in sorted(samples_dir.glob("*_full.jpg"))[:6]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "README.txt").write_text("non-image files are skipped")
    return folder.parent


def _quantize(*args):
    """`ptq quantize ARGS`, with the round-to-nearest recipe unless ARGS name one: these tests are about the command,
    and the default recipe's GPTQ and reconstruction take longer (test_the_default_recipe covers it)."""
    recipe = [] if "--recipe" in args else ["--recipe", "rtn"]
    return runner.invoke(app, ["quantize", *map(str, args), *recipe])


def test_quantize_writes_a_complete_output_folder(tmp_path, checkpoint, few_photos):
    out = tmp_path / "out"
    result = _quantize(
        "test_resnet",
        "--checkpoint",
        checkpoint,
        "--bits",
        4,
        "--calib-data",
        few_photos,
        "--out",
        out,
        "--set",
        "quant.first_last_bits=all",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "model.safetensors",
        "quant_config.json",
        "recipe.yaml",
        "report.json",
    ]
    report = json.loads((out / "report.json").read_text())
    assert report["w_bits"] == 4 and report["a_bits"] == 4 and report["calibration"]["images"] == 6
    assert report["size"]["ratio"] < 0.16
    assert "agreement" in result.output
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["bit_convention"] == "all" and meta["checkpoint"] == str(checkpoint)
    # the output evaluates as a quantized model against its FP parent
    table = tmp_path / "results.json"
    result = runner.invoke(
        app, ["evaluate", str(out), "--data", str(few_photos), "--out", str(table), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(table.read_text())
    assert rows[0]["kind"] == "quantized" and rows[0]["agreement"] is not None and rows[0]["top1"] is None
    assert set(rows[0]) >= {"model", "top1", "top5", "agreement", "kl", "sqnr_db"}
    # the same numbers as the report made at quantization time
    assert rows[0]["agreement"] == pytest.approx(report["evaluation"]["agreement"])
    assert rows[0]["sqnr_db"] == pytest.approx(report["evaluation"]["sqnr_db"], rel=1e-4)


def test_w_bits_and_a_bits_override_bits(tmp_path, checkpoint, few_photos):
    out = tmp_path / "o"
    result = _quantize(
        "test_resnet",
        "--checkpoint",
        checkpoint,
        "--bits",
        8,
        "--w-bits",
        4,
        "--calib-data",
        few_photos,
        "--out",
        out,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["quant"]["w_bits"] == 4 and meta["quant"]["a_bits"] == 8


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path, checkpoint, few_photos):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    args = ["test_resnet", "--checkpoint", checkpoint, "--calib-data", few_photos, "--out", out, "--device", "cpu"]
    result = _quantize(*args)
    assert result.exit_code != 0 and "--overwrite" in result.output
    assert (out / "mine.txt").read_text() == "user data"
    assert _quantize(*args, "--overwrite").exit_code == 0
    assert (out / "report.json").is_file() and not (out / "mine.txt").exists()
    assert not list(tmp_path.glob(".out.*")), "staging folders left behind"


def test_interrupted_run_leaves_no_output(tmp_path, checkpoint, few_photos, monkeypatch):
    import ptq.pipeline

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ptq.pipeline, "save_quantized", boom)
    out = tmp_path / "out"
    result = _quantize(
        "test_resnet", "--checkpoint", checkpoint, "--calib-data", few_photos, "--out", out, "--device", "cpu"
    )
    assert result.exit_code != 0
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["no_such_net", "--calib-data", "{photos}"], "unknown model"),
        (["resnet_18", "--calib-data", "{photos}"], "closest timm names: resnet18"),
        (["resnet18", "--calib-data", "{photos}"], "--checkpoint"),
        (["test_resnet", "--checkpoint", "{ckpt}", "--calib-data", "{tmp}/missing"], "does not exist"),
        (["test_resnet", "--checkpoint", "{ckpt}", "--calib-data", "{empty}"], "no images"),
        (["test_resnet", "--checkpoint", "{ckpt}", "--calib-data", "{photos}", "--bits", "9"], "--bits must be"),
        (["test_resnet", "--checkpoint", "{ckpt}", "--calib-data", "{photos}", "--w-bits", "1"], "--w-bits must be"),
        (["test_resnet", "--checkpoint", "{tmp}/corrupt.pth", "--calib-data", "{photos}"], "could not be read"),
        (["test_resnet", "--checkpoint", "{tmp}/nope.pth", "--calib-data", "{photos}"], "does not exist"),
        (["test_resnet", "--checkpoint", "{ckpt}", "--calib-data", "{photos}", "--set", "quant.bits=3"], "unknown key"),
        (["test_resnet", "--checkpoint", "{ckpt}", "--calib-data", "{photos}", "--recipe", "nope"], "shipped recipes"),
        (["test_resnet", "--checkpoint", "{ckpt}", "--zero-shot", "--synth-method", "fdda"], "--calib-data"),
        (["test_resnet", "--checkpoint", "{ckpt}", "--zero-shot", "--synth-method", "magic"], "must be one of: bns"),
        (["test_resnet", "--checkpoint", "{ckpt}", "--calib-data", "{photos}", "--num-images", "8"], "--zero-shot"),
        (["test_resnet", "--checkpoint", "{ckpt}"], "--calib-data"),
        (["test_efficientnet", "--checkpoint", "{ckpt}", "--calib-data", "{photos}"], "does not match"),
    ],
)
def test_bad_input_gets_a_one_line_error(tmp_path, checkpoint, few_photos, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.pth").write_bytes(b"\x00garbage")
    subs = {
        "{photos}": str(few_photos),
        "{ckpt}": str(checkpoint),
        "{tmp}": str(tmp_path),
        "{empty}": str(tmp_path / "empty"),
    }
    args = [next((a.replace(k, v) for k, v in subs.items() if k in a), a) for a in args]
    out = tmp_path / "out"
    result = _quantize(*args, "--out", out, "--device", "cpu")
    assert result.exit_code != 0
    assert message in result.output
    assert len([line for line in result.output.strip().splitlines() if line.strip()]) == 1, result.output
    assert not out.exists()


def test_evaluate_bad_inputs(tmp_path, few_photos):
    result = runner.invoke(
        app, ["evaluate", "test_resnet", "--data", str(few_photos), "--out", str(tmp_path / "r.txt")]
    )
    assert result.exit_code != 0 and ".csv or .json" in result.output
    existing = tmp_path / "r.csv"
    existing.write_text("keep me")
    result = runner.invoke(app, ["evaluate", "test_resnet", "--data", str(few_photos), "--out", str(existing)])
    assert result.exit_code != 0 and "--overwrite" in result.output and existing.read_text() == "keep me"
    result = runner.invoke(app, ["evaluate", "test_resnet", "--data", str(tmp_path / "none")])
    assert result.exit_code != 0 and "does not exist" in result.output
    # every model failing is a failed run; the table still names each error
    result = runner.invoke(app, ["evaluate", "resnet18", "--data", str(few_photos), "--device", "cpu"])
    assert result.exit_code == 1 and "checkpoint" in result.output


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "quantize" in result.output and "evaluate" in result.output


def test_help_and_argument_errors_answer_before_torch_is_imported(tmp_path):
    """`ptq --help`, a command's --help and a bad argument need neither torch nor timm (seconds of imports)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from ptq.cli import main\n"
        "sys.argv = ['ptq', *sys.argv[1:]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, [m for m in ('torch', 'timm') if m in sys.modules], file=sys.stderr)\n"
    )
    for args, code in ((["--help"], 0), (["quantize", "--help"], 0), (["quantize", "m", "--bits", "5x"], 2)):
        result = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert f"exit {code} []" in result.stderr, (args, result.stdout, result.stderr)


def test_the_package_names_and_subpackages_resolve_on_first_use():
    """`import ptq` is light; its public names and subpackages (`ptq.quant`, `ptq.recon`) come when first used."""
    import subprocess
    import sys

    probe = (
        "import sys, ptq\n"
        "assert 'torch' not in sys.modules\n"
        "assert all(getattr(ptq, name) is not None and name in dir(ptq) for name in ptq.__all__)\n"
        "assert callable(ptq.quant.calibrate) and callable(ptq.recon.find_units)\n"
        "try:\n"
        "    ptq.nothing\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "module 'ptq' has no attribute 'nothing'" in result.stdout, result.stderr


def test_real_pretrained_lite0_w8a8_end_to_end(tmp_path, few_photos):
    """The demo's job on real ImageNet weights, on six photos: W8A8 keeps most top-1 predictions of FP."""
    out = tmp_path / "lite0"
    result = _quantize(
        "tf_efficientnet_lite0", "--bits", 8, "--calib-data", few_photos, "--out", out, "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["weights"].startswith("offline weights")
    assert report["evaluation"]["agreement"] >= 50 and report["evaluation"]["sqnr_db"] > 10
    assert report["size"]["ratio"] < 0.27


def test_checkout_runner_works_without_installing():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "cli.py", "--help"], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "quantize" in result.stdout


def test_quantized_output_whose_parent_is_gone_still_reports_what_it_can(tmp_path, few_photos):
    ckpt = random_checkpoint(tmp_path, "test_resnet")
    out = tmp_path / "q"
    assert _quantize("test_resnet", "--checkpoint", ckpt, "--calib-data", few_photos, "--out", out).exit_code == 0
    ckpt.unlink()
    table = tmp_path / "r.csv"
    result = runner.invoke(app, ["evaluate", str(out), "--data", str(few_photos), "--out", str(table)])
    assert result.exit_code == 0, result.output
    assert "FP parent unavailable" in result.output
    header, row = table.read_text().splitlines()[:2]
    assert header.startswith("model,kind,top1,top5,agreement,kl,sqnr_db,images,seconds,error")
    assert ",6," in row  # six images were still evaluated


def test_quantize_with_reconstruction_resumes_and_cleans_up(tmp_path, checkpoint, few_photos):
    out = tmp_path / "q"
    args = ["test_resnet", "--checkpoint", checkpoint, "--bits", 4, "--calib-data", few_photos, "--out", out,
            "--method", "qdrop", "--set", "recon.iters=5", "--device", "cpu"]  # fmt: skip
    result = _quantize(*args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "qdrop" and report["reconstruction"]["keep_prob"] == 0.5
    assert report["reconstruction"]["units"] == len(report["reconstruction"]["per_unit"]) > 3
    assert not (tmp_path / ".q.recon").exists()
    assert _quantize(*args[:-2], "--method", "magic", "--device", "cpu").exit_code != 0


@pytest.mark.parametrize("recipe", ["brecq", "genie-m", "adaround"])
def test_every_reconstruction_recipe_runs_end_to_end(tmp_path, checkpoint, few_photos, recipe):
    out = tmp_path / "q"
    result = _quantize("test_resnet", "--checkpoint", checkpoint, "--bits", 4, "--calib-data", few_photos,
                       "--out", out, "--recipe", recipe, "--set", "recon.iters=4", "--set", "calib.num_images=8",
                       "--set", "recon.cache_dtype=float16", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    recon = json.loads((out / "report.json").read_text())["reconstruction"]
    expected = {"brecq": "second_pass", "genie-m": "joint", "adaround": "fixed"}[recipe]
    assert recon["act_steps"] == expected and recon["learn_weight_scale"] == (recipe == "genie-m")
    assert recon["cache"]["placement"] == "cpu" and recon["cache"]["dtype"] == "float16"
    assert recon["reg_weight"] == (1.0 if recipe == "genie-m" else 0.01)  # test_resnet has no depthwise convs


def test_gptq_with_bias_correction_resumes_per_layer_and_gives_the_uninterrupted_result(
    tmp_path, checkpoint, few_photos, monkeypatch
):
    from safetensors.torch import load_file

    from ptq.recon import layerwise

    args = ["test_resnet", "--checkpoint", checkpoint, "--bits", 4, "--calib-data", few_photos, "--method", "gptq",
            "--set", "quant.bias_correction=empirical", "--device", "cpu"]  # fmt: skip
    assert _quantize(*args, "--out", tmp_path / "one").exit_code == 0
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    rounding = report["rounding"]
    assert report["method"] == "gptq" and rounding["rounding"] == "gptq" and rounding["bias_correction"] == "empirical"
    assert len(rounding["per_layer"]) == rounding["layers"] == report["layers"]["quantized"]
    assert sum(r["error"] for r in rounding["per_layer"]) < sum(r["rtn_error"] for r in rounding["per_layer"])
    assert "round" in report["timings_s"]

    calls, original = [], layerwise._round_layer

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return original(*a, **kw)

    monkeypatch.setattr(layerwise, "_round_layer", interrupted)
    result = _quantize(*args, "--out", tmp_path / "two")
    assert result.exit_code == 130 and "rerun the same command to resume" in " ".join(result.output.split())
    assert len(list((tmp_path / ".two.recon").glob("layer_*.safetensors"))) == 3 and not (tmp_path / "two").exists()
    monkeypatch.undo()
    assert _quantize(*args, "--out", tmp_path / "two").exit_code == 0
    resumed = json.loads((tmp_path / "two" / "report.json").read_text())["rounding"]["per_layer"]
    assert [r.get("resumed", False) for r in resumed][:4] == [True, True, True, False]
    one, two = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert not (tmp_path / ".two.recon").exists()


def test_reconstruction_can_start_from_gptq(tmp_path, checkpoint, few_photos):
    out = tmp_path / "q"
    result = _quantize("test_resnet", "--checkpoint", checkpoint, "--bits", 4, "--calib-data", few_photos,
                       "--out", out, "--method", "qdrop", "--set", "recon.init=gptq", "--set", "recon.iters=4",
                       "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["rounding"]["rounding"] == "gptq" and report["reconstruction"]["init"] == "gptq"
    assert "round" in report["timings_s"] and "reconstruct" in report["timings_s"]


def test_the_default_recipe_is_gptq_with_bias_correction_then_qdrop_where_it_is_cheap(tmp_path, checkpoint, few_photos):
    """test_resnet at 160² would cost about 4,900 GMAC of reconstruction, over the default's 2,000: GPTQ's rounding
    with bias correction stands, and the report says why."""
    out = tmp_path / "q"
    result = runner.invoke(
        app,
        ["quantize", "test_resnet", "--checkpoint", str(checkpoint), "--bits", "4", "--calib-data", str(few_photos),
         "--out", str(out), "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "qdrop" and report["reconstruction"]["skipped"] is True
    assert report["reconstruction"]["estimated_gmacs"] == pytest.approx(3 * 0.1025472 * 32 * 500, rel=1e-3)
    assert report["rounding"]["rounding"] == "gptq" and report["rounding"]["bias_correction"] == "empirical"
    assert "reconstruction" in result.output and "skipped" in result.output
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["synth"]["num_images"] * recipe["synth"]["iters"] <= 64 * 100
    assert recipe["recon"]["init"] == "gptq" and recipe["recon"]["budget_gmacs"] == 2000


def test_reconstruction_budget_counts_three_times_the_forward_macs_per_step():
    from ptq.config import ConfigError, QuantConfig, ReconConfig
    from ptq.pipeline import over_budget
    from ptq.quant import prepare

    torch.manual_seed(0)
    model = timm.create_model("test_resnet").eval()
    macs = []  # counted on the FP model: output positions × weights per output channel, every conv and linear
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(lambda m, x, y: macs.append(y[0].numel() * m.weight[0].numel()))
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    per_image = sum(macs) / 1e9
    qmodel = prepare(model, QuantConfig(w_bits=4), torch.zeros(1, 3, 64, 64))
    skipped = over_budget(qmodel, ReconConfig(iters=100, batch_size=8, budget_gmacs=1))
    assert skipped["estimated_gmacs"] == pytest.approx(3 * per_image * 8 * 100, rel=0.01)
    assert over_budget(qmodel, ReconConfig(iters=100, batch_size=8, budget_gmacs=100)) is None
    assert over_budget(qmodel, ReconConfig(iters=10**6)) is None  # no budget: reconstruction always runs
    with pytest.raises(ConfigError, match="budget_gmacs"):
        ReconConfig(budget_gmacs=0)


def test_progress_without_a_terminal_is_plain_lines_with_eta():
    """Redirected output (a log file, a batch job) gets a line per stage start and end and at most one per
    10 s in between, each with elapsed time and ETA."""
    from ptq.cli import PlainProgress

    now, lines = [0.0], []
    progress = PlainProgress(lines.append, every=10, clock=lambda: now[0])
    for step in range(6):
        now[0] = step * 4.0
        progress("reconstruct", step, 5, note=f"unit {step}")
        progress("reconstruct", step, 5)  # a repeated value writes nothing
    assert lines == [
        "reconstruct: 0/5 elapsed 0:00:00 unit 0",
        "reconstruct: 3/5 elapsed 0:00:12 eta 0:00:08 unit 3",
        "reconstruct: 5/5 elapsed 0:00:20 unit 5 done",
    ]


def test_every_error_ptq_explains_is_one_class_the_command_line_catches():
    from ptq import PtqError
    from ptq._io import OutputError
    from ptq.cli import USER_ERRORS
    from ptq.config import ConfigError
    from ptq.data import DataError
    from ptq.distributed import DistributedError
    from ptq.export.checkpoint import CheckpointError
    from ptq.export.onnx import ExportError
    from ptq.mixed.allocate import AllocationError
    from ptq.models import ModelLoadError
    from ptq.recon.run import ReconError
    from ptq.synth.synthesizer import SynthError

    errors = (OutputError, ConfigError, DataError, DistributedError, CheckpointError, ExportError, AllocationError,
              ModelLoadError, ReconError, SynthError)  # fmt: skip
    assert USER_ERRORS == (PtqError,) and all(issubclass(e, PtqError) for e in errors)
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, RuntimeError)  # callers' excepts still work
