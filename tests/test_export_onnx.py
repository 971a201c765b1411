"""ONNX QDQ export: the file computes what ptq's model computes (in onnxruntime), holds integer weights and no float
copy of them, runs integer kernels where it should, is evaluated like a checkpoint, and refuses bad input."""

import json
import sys
from collections import Counter

import numpy as np
import pytest
import timm
import torch
from conftest import random_bn_stats, random_checkpoint
from typer.testing import CliRunner

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, numpy_helper  # noqa: E402

from ptq.cli import app  # noqa: E402
from ptq.config import QuantConfig  # noqa: E402
from ptq.export import save_quantized  # noqa: E402
from ptq.export.onnx import (  # noqa: E402
    ExportError,
    OnnxModel,
    _pack_int4,
    compare,
    export_onnx,
)
from ptq.quant import calibrate, prepare  # noqa: E402
from ptq.quant.functional import sqnr_db  # noqa: E402
from ptq.quant.modules import quant_layers  # noqa: E402

runner = CliRunner()
SIZE = 64
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


def _folder(tmp_path, name, w_bits, a_bits, mixed=False, **quant):
    """A ptq output folder (checkpoint + a minimal report) of a seeded random `name` with real BN statistics."""
    torch.manual_seed(0)
    model = random_bn_stats(timm.create_model(name))
    x = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits, **quant)
    qmodel = prepare(model, config, x[:1])
    if mixed:  # every width the exporter stores: 2, 3, 4 (INT4/UINT4), 5, 8 (INT8/UINT8)
        for i, layer in enumerate(quant_layers(qmodel).values()):
            layer.weight_quantizer.bits = (2, 3, 4, 5, 8)[i % 5]
    qmodel = calibrate(qmodel, [x], config)
    folder = tmp_path / f"{name}-w{w_bits}a{a_bits}"
    folder.mkdir()
    save_quantized(qmodel, folder, name, config, {"input_size": (3, SIZE, SIZE), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    (folder / "report.json").write_text(json.dumps({"model": name}))
    return folder, qmodel


def _initializers(path):
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize(
    "name,w_bits,a_bits,mixed",
    [("test_resnet", 8, 8, False), ("test_efficientnet", 4, 8, False), ("test_efficientnet", 4, 4, True)],
)
def test_export_computes_what_ptq_computes_with_integer_weights_only(tmp_path, name, w_bits, a_bits, mixed):
    folder, qmodel = _folder(tmp_path, name, w_bits, a_bits, mixed)
    facts = export_onnx(folder)
    path = folder / "model.onnx"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    check = facts["verification"]
    assert check["passed_by"] == "match" or check["fidelity_db"] >= check["ptq_fidelity_db"] - 1.0
    assert json.loads((folder / "report.json").read_text())["export"]["onnx"]["bytes"] == path.stat().st_size

    x = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))  # not the verification inputs
    result = compare(qmodel, OnnxModel(path), x)
    assert result["sqnr_db"] >= 30 or result["fidelity_db"] >= result["ptq_fidelity_db"] - 1.0, result

    inits = _initializers(path)
    expected = {2: (TensorProto.UINT4,), 3: (TensorProto.UINT4,), 4: (TensorProto.UINT4,), 5: (TensorProto.UINT8,)}
    for layer_name, layer in quant_layers(qmodel).items():
        codes = inits[f"model.{layer_name}.qweight"]
        bits = layer.weight_quantizer.bits
        assert codes.data_type in expected.get(bits, (TensorProto.UINT8,)), (layer_name, bits)
        values = numpy_helper.to_array(codes).astype(np.int64)
        assert values.min() >= 0 and values.max() <= 2**bits - 1  # on the layer's own grid
        assert list(codes.dims) == list(layer.weight.shape)
    weight_shapes = {tuple(layer.weight.shape) for layer in quant_layers(qmodel).values()}
    floats = [t.name for t in inits.values() if t.data_type in FLOAT_TYPES and tuple(t.dims) in weight_shapes]
    assert not floats, f"float copies of quantized weights: {floats[:3]}"


def test_int4_packing_reads_back_through_onnx():
    for values, kind in ((np.array([-8, 7, 0, -1, 3]), TensorProto.INT4), (np.array([0, 15, 9, 1]), TensorProto.UINT4)):
        tensor = onnx.helper.make_tensor("t", kind, [len(values)], vals=_pack_int4(values), raw=True)
        assert np.array_equal(numpy_helper.to_array(tensor).astype(np.int64), values)


def test_symmetric_low_bit_weights_are_signed_and_integer_kernels_run(tmp_path):
    """W7A8 with symmetric weights and every conv output quantized: signed INT8 codes with zero point 0, and
    onnxruntime's optimised graph runs every conv — the first too: the image gets an 8-bit input quantizer — as
    QLinearConv, and the residual adds as QLinearAdd."""
    folder, _ = _folder(
        tmp_path, "test_resnet", 7, 8, w_symmetric=True, quantize_layer_outputs=True, first_last_bits="all"
    )
    facts = export_onnx(folder)
    assert facts["weights"] == {"INT8": facts["weights"]["INT8"]} and facts["verification"]["passed_by"]
    inits = _initializers(folder / "model.onnx")
    zeros = [numpy_helper.to_array(t) for n, t in inits.items() if n.endswith(".qzero")]
    assert zeros and all(z.dtype == np.int8 and not z.any() for z in zeros)
    OnnxModel(folder / "model.onnx", optimized_path=tmp_path / "optimized.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in timm.create_model("test_resnet").modules())
    assert ops["QLinearConv"] == convs and ops["QLinearAdd"] > 0 and ops["Conv"] + ops["FusedConv"] == 0, ops


def test_fixed_batch_and_older_opset_export(tmp_path):
    """--batch 2 runs any number of images (padded chunks); below opset 21 4-bit weights are stored as UINT8."""
    folder, qmodel = _folder(tmp_path, "test_resnet", 4, 8)
    facts = export_onnx(folder, out=tmp_path / "b2.onnx", batch=2, opset=18)
    assert set(facts["weights"]) == {"UINT8"} and facts["int4_initializers"] == 0
    assert {o.version for o in onnx.load(str(tmp_path / "b2.onnx")).opset_import if o.domain == ""} == {18}
    model = OnnxModel(tmp_path / "b2.onnx")
    assert model.batch == 2
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert sqnr_db(qmodel(x), model(x)) >= 20


def test_a_wrong_export_fails_verification_naming_the_first_diverging_quantizer(tmp_path, monkeypatch):
    import ptq.export.onnx as export

    folder, _ = _folder(tmp_path, "test_resnet", 8, 8)
    original = export._Act.__init__

    def skewed(self, quantizer, signed):  # a wrong step for the third activation quantizer
        original(self, quantizer, signed)
        skewed.calls += 1
        if self.qparams is not None and skewed.calls == 3:
            self.qparams = (self.qparams[0] / 4, *self.qparams[1:])  # clips three quarters of its range

    skewed.calls = 0
    monkeypatch.setattr(export._Act, "__init__", skewed)
    with pytest.raises(ExportError, match="does not compute what ptq's model computes.*first diverging activation: "):
        export_onnx(folder)
    assert not (folder / "model.onnx").exists()


def test_export_bad_input(tmp_path, monkeypatch):
    folder, _ = _folder(tmp_path, "test_resnet", 8, 8)
    cases = [
        (["export", str(tmp_path / "nowhere")], "is not a quantized model folder"),
        (["export", str(tmp_path)], "point at a folder made by `ptq quantize`"),
        (["export", str(folder), "--batch", "two"], "--batch takes dynamic or a positive integer"),
        (["export", str(folder), "--format", "tflite"], "the format ptq exports is onnx"),
        (["export", str(folder), "--opset", "17"], "--opset 17 is not supported"),
        (["export", str(folder), "--weights", "signed"], "asymmetric weight grid"),
        (["export", str(folder), "--out", str(tmp_path / "m.txt")], "must end in .onnx"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert not list(folder.glob("*.onnx")) and not list(folder.glob(".*tmp"))

    (folder / "model.onnx").write_text("a user's file")
    result = runner.invoke(app, ["export", str(folder)])
    assert result.exit_code == 2 and "already exists" in result.output
    assert (folder / "model.onnx").read_text() == "a user's file"

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the optional extra is not installed
    result = runner.invoke(app, ["export", str(folder), "--overwrite"])
    assert result.exit_code == 2 and "pip install 'ptq[onnx]'" in result.output


def test_a_layer_kind_without_an_onnx_form_is_named(tmp_path):
    from ptq.export.onnx import write_onnx

    class OddConv(torch.nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(OddConv(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    x = torch.randn(2, 3, 8, 8)
    model(x)
    config = QuantConfig()
    qmodel = calibrate(prepare(model, config, x[:1]), [x], config)
    with pytest.raises(ExportError, match="layer 0 .*OddConv.* has no ONNX form"):
        write_onnx(qmodel, tmp_path / "m.onnx", tuple(x.shape))
    assert not (tmp_path / "m.onnx").exists()


def test_quantize_export_shortcut_and_evaluate_on_the_onnx_file(tmp_path, samples_dir):
    ckpt = random_checkpoint(tmp_path, "test_efficientnet")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["quantize", "test_efficientnet", "--checkpoint", str(ckpt), "--bits", "8", "--calib-data", str(samples_dir),
         "--recipe", "rtn", "--out", str(out), "--export", "onnx", "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["onnx"]["verification"]["data"] == str(samples_dir)
    assert json.loads((out / "quant_config.json").read_text())["quant"]["quantize_layer_outputs"] is True

    table = tmp_path / "eval.json"
    result = runner.invoke(
        app, ["evaluate", str(out), str(out / "model.onnx"), "--data", str(samples_dir), "--out", str(table)]
    )
    assert result.exit_code == 0, result.output
    checkpoint_row, onnx_row = json.loads(table.read_text())
    assert onnx_row["kind"] == "onnx" and onnx_row["error"] is None and onnx_row["images"] == checkpoint_row["images"]
    assert abs(onnx_row["agreement"] - checkpoint_row["agreement"]) <= 10
    assert onnx_row["kl"] == pytest.approx(checkpoint_row["kl"], rel=0.25, abs=0.01)
