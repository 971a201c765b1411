"""Behaviour pinned: a seeded W4A4 run of GPTQ with bias correction (the default recipe where reconstruction is over
its budget, as for this model) on a small timm model, through the command line and through
`ptq.quantize(...).save()`, gives the checkpoint recorded in tests/data/golden_fast_w4a4.json — the same integer
codes, bit for bit, and the same scales, zero points and biases (bit-identical on the machine that made the record;
to 1e-5 relative elsewhere, where float sums may round differently). The record was made by the command line before
the package's layout changed (`ptq quantize test_resnet --checkpoint W --calib-data data/samples --recipe fast
--bits 4 --set calib.num_images=4 --set calib.batch_size=4`, W the seeded weights below, when that recipe was GPTQ
with bias correction alone); refactoring must not change it. The command line runs `--method gptq`; Python the
default recipe as it is now, whose QDrop pass this model's size skips: both must give the record. A change of
behaviour that is meant rewrites the record: `python tests/test_golden.py OUT_FOLDER`."""

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from conftest import SAMPLES, random_checkpoint
from safetensors.torch import load_file
from typer.testing import CliRunner

import ptq
from ptq.cli import app

GOLDEN = Path(__file__).parent / "data" / "golden_fast_w4a4.json"


def record(folder: Path) -> dict:
    """Integer tensors by digest; float tensors by value (9 significant digits: exact for float32); the
    quantization config without the machine-specific checkpoint path."""
    tensors = {}
    for key, value in sorted(load_file(str(folder / "model.safetensors")).items()):
        entry = {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}
        if value.is_floating_point():
            entry["values"] = [float(f"{x:.9g}") for x in value.flatten().tolist()]
        else:
            entry["sha256"] = hashlib.sha256(value.contiguous().numpy().tobytes()).hexdigest()
        tensors[key] = entry
    config = json.loads((folder / "quant_config.json").read_text())
    config.pop("checkpoint", None)
    return {"tensors": tensors, "quant_config": config}


def test_seeded_default_recipe_run_matches_the_record_from_the_command_line_and_python(tmp_path):
    weights = random_checkpoint(tmp_path, "test_resnet")
    few = tmp_path / "few"  # the report's evaluation, on two photos
    few.mkdir()
    for photo in sorted(SAMPLES.glob("*.jpg"))[:2]:
        shutil.copy(photo, few / photo.name)
    args = ["quantize", "test_resnet", "--checkpoint", str(weights), "--calib-data", str(SAMPLES), "--recipe", "fast",
            "--method", "gptq", "--bits", "4", "--set", "calib.num_images=4", "--set", "calib.batch_size=4",
            "--device", "cpu", "--eval-data", str(few), "--out", str(tmp_path / "cli")]  # fmt: skip
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert re.search(r"^activation ranges: \d+/\d+ elapsed \d:\d\d:\d\d done$", done.output, re.M), done.output
    qmodel = ptq.quantize("test_resnet", calib=SAMPLES, checkpoint=weights, recipe="fast", bits=4,
                          calib_num_images=4, calib_batch_size=4, device="cpu")  # fmt: skip
    qmodel.save(tmp_path / "py")
    report = json.loads((tmp_path / "py" / "report.json").read_text())
    assert report["method"] == "qdrop" and report["reconstruction"]["skipped"] is True
    assert report["w_bits"] == 4 and report["calibration"]["images"] == 4 and report["size"]["ratio"] < 0.3
    want = json.loads(GOLDEN.read_text())
    for folder in ("cli", "py"):
        got = record(tmp_path / folder)
        assert got["quant_config"] == want["quant_config"], folder
        assert got["tensors"].keys() == want["tensors"].keys(), folder
        for key, expected in want["tensors"].items():
            actual = got["tensors"][key]
            assert (actual["dtype"], actual["shape"]) == (expected["dtype"], expected["shape"]), key
            if "sha256" in expected:
                assert actual["sha256"] == expected["sha256"], f"{folder} {key}: integer codes changed"
            else:
                a, b = torch.tensor(actual["values"]), torch.tensor(expected["values"])
                close = torch.allclose(a, b, rtol=1e-5, atol=1e-7)
                assert close, f"{folder} {key}: max difference {(a - b).abs().max():.3g}"


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(record(Path(sys.argv[1]))))
    print(f"wrote {GOLDEN}")
