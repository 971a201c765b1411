"""The Python front door: ptq.quantize / synthesize / evaluate / load_quantized on timm names and in-memory models."""

import json
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
from conftest import ROOT, SAMPLES
from safetensors.torch import load_file, save_file
from torch import nn

import ptq
from ptq.data import ImageFolder

SIZE = {"input_size": (3, 64, 64)}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("test_resnet").eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(24, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_command_and_python_write_the_same_checkpoint(tmp_path, tiny):
    """The same seeded job through `ptq quantize` and through `ptq.quantize(...).save()`: identical tensors and
    quantization config (the CLI is a shell over the same job)."""
    weights = tmp_path / "w.safetensors"
    save_file(tiny.state_dict(), str(weights))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["quantize", "test_resnet", "--checkpoint", str(weights), "--calib-data", str(SAMPLES), "--recipe", "rtn",
            "--bits", "4", "--set", "calib.num_images=16", "--out", str(tmp_path / "cli")]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "ptq.cli", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^activation ranges: \d+/\d+ elapsed \d:\d\d:\d\d done$", done.stderr, re.M), done.stderr
    qmodel = ptq.quantize(
        "test_resnet", calib=SAMPLES, checkpoint=weights, recipe="rtn", bits=4, calib_num_images=16, device="cpu"
    )
    qmodel.save(tmp_path / "py")
    a, b = load_file(str(tmp_path / "cli" / "model.safetensors")), load_file(str(tmp_path / "py" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    configs = [json.loads((tmp_path / d / "quant_config.json").read_text()) for d in ("cli", "py")]
    assert configs[0] == configs[1]
    report = json.loads((tmp_path / "py" / "report.json").read_text())
    assert report["w_bits"] == 4 and report["calibration"]["images"] == 16 and report["size"]["ratio"] < 0.3


def test_in_memory_model_tensor_or_loader_and_reload(tmp_path, tiny, images):
    qmodel = ptq.quantize(tiny, calib=images, recipe="rtn", w_bits=4, a_bits=8, data_config=SIZE, device="cpu")
    assert isinstance(qmodel, ptq.QuantizedModel) and qmodel.name == "test_resnet"
    assert {v["w_bits"] for v in qmodel.bits.values()} == {4, 8}  # first/last at 8 (qdrop convention)
    assert qmodel.report.calibration == {"data": "in-memory images", "images": 24, "synthetic": None}
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(24)), batch_size=10)
    again = ptq.quantize(tiny, calib=loader, recipe="rtn", w_bits=4, a_bits=8, data_config=SIZE, device="cpu")
    x = images[:4]
    with torch.no_grad():
        assert qmodel(x).shape == tiny(x).shape
        assert torch.equal(qmodel(x), again(x))
        assert not torch.equal(qmodel(x), tiny(x))  # quantized, and the original left untouched
        assert all(isinstance(m, nn.Conv2d) for m in tiny.modules() if "conv" in type(m).__name__.lower())
    qmodel.save(tmp_path / "out")
    with pytest.raises(Exception, match="not empty|exists"):
        qmodel.save(tmp_path / "out")  # nothing a user made is overwritten silently
    loaded = ptq.load_quantized(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    assert loaded.recipe.quant.w_bits == 4 and loaded.report.w_bits == 4 and loaded.report.size["ratio"] < 0.3


def test_a_model_timm_does_not_know(tmp_path, images):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()  # fmt: skip
    with pytest.raises(ptq.ConfigError, match="not a timm model.*data_config"):
        ptq.quantize(model, calib=images, recipe="rtn")
    qmodel = ptq.quantize(model, calib=images, recipe="rtn", data_config=SIZE, device="cpu")
    qmodel.save(tmp_path / "seq")
    with pytest.raises(Exception, match="pass the FP model"):
        ptq.load_quantized(tmp_path / "seq")
    with torch.no_grad():
        assert torch.equal(ptq.load_quantized(tmp_path / "seq", model=model)(images), qmodel(images))


def test_keyword_overrides_are_typed_and_checked(tiny, images):
    run = dict(calib=images, recipe="rtn", data_config=SIZE, device="cpu")
    for bad, message in [
        ({"w_bits": "four"}, "w_bits takes a bit width"),
        ({"a_bits": 9}, "a_bits must be an integer from 2 to 8"),
        ({"synth_iter": 5}, "unknown option 'synth_iter'; did you mean synth_iters"),
        ({"bias_correction": "sometimes"}, "must be one of: off, empirical, analytic"),
        ({"calib_num_images": "16"}, "calib.num_images must be int"),  # no string is re-parsed
        ({"bits": "auto"}, "needs a budget"),
    ]:
        with pytest.raises(ptq.ConfigError, match=re.escape(message) if "(" in message else message):
            ptq.quantize(tiny, **run, **bad)
    with pytest.raises(ptq.ConfigError, match=r"\(N, C, H, W\)"):
        ptq.quantize(tiny, calib=images[0], recipe="rtn", data_config=SIZE)


def test_synthesize_and_evaluate(tmp_path, tiny):
    fake = torch.randn(8, 3, 64, 64)
    images = ptq.synthesize(tiny, 8, method="intraq", synth_iters=2, synth_batch_size=8, data_config=SIZE,
                            out=tmp_path / "synth", device="cpu")  # fmt: skip
    assert images.shape == fake.shape and torch.isfinite(images).all()
    assert torch.equal(ptq.synthesize(tiny, 8, method="intraq", synth_iters=2, synth_batch_size=8, data_config=SIZE,
                                      out=tmp_path / "synth", device="cpu"), images)  # fmt: skip  # reused
    qmodel = ptq.quantize(tiny, calib="zero-shot", recipe="rtn", bits=8, synth_iters=2, num_images=8,
                          synth_batch_size=8, data_config=SIZE, device="cpu")  # fmt: skip
    assert qmodel.report.calibration["data"] == "synthetic" and qmodel.report.calibration["images"] == 8
    rows = ptq.evaluate([(qmodel, tiny), tiny], SAMPLES, device="cpu")
    assert [r.kind for r in rows] == ["quantized", "fp"] and all(r.error is None for r in rows)
    assert rows[0].images == len(ImageFolder(SAMPLES, qmodel.data_config)) and rows[0].sqnr_db > 10
    assert rows[1].agreement is None


def test_the_readme_python_section_runs_as_written(tmp_path):
    """The README's Python section, executed as written from a folder holding the repository's data/."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))
    assert "ptq.quantize" in code and "ptq.evaluate" in code
    (tmp_path / "data").symlink_to(ROOT / "data")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "runs" / "lite0-w8a8" / "model.safetensors").is_file()
