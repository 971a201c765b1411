"""Mixed precision: the ILP's optimum and budgets, sensitivity that means something, and the allocation end to end."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import random_checkpoint
from torch import nn
from typer.testing import CliRunner

from ptq.cli import app
from ptq.config import BitConvention, ConfigError, LayerKind, MixedConfig, QuantConfig, load_recipe
from ptq.export import load_quantized
from ptq.mixed import AllocationError, Budget, allocate, measure_sensitivity
from ptq.mixed.allocate import evaluate, pareto_front
from ptq.mixed.sensitivity import LayerSensitivity, SensitivityTable, hessian_traces
from ptq.quant import prepare

runner = CliRunner()


def _table() -> SensitivityTable:
    """Three layers whose sensitivities make the cheapest choice wrong: the small layer is the sensitive one."""
    omegas = {  # Ω(b) = trace · perturbation, trace 1
        "a": {2: 9.0, 4: 2.0, 8: 0.1},
        "b": {2: 1.0, 4: 0.5, 8: 0.0},
        "c": {2: 30.0, 4: 3.0, 8: 0.2},
    }
    sizes = {"a": 4000, "b": 8000, "c": 1000}
    layers = [
        LayerSensitivity(n, LayerKind.CONV, sizes[n], 1, 10 * sizes[n], 8, [2, 4, 8], 1.0, omegas[n]) for n in omegas
    ]
    return SensitivityTable("toy", BitConvention.ALL, [2, 4, 8], layers)


def _brute_force(table, fits):
    best = None
    for choice in itertools.product(*[layer.allowed for layer in table.layers]):
        bits = {layer.name: b for layer, b in zip(table.layers, choice, strict=True)}
        a = evaluate(table, bits)
        if fits(a) and (best is None or a.predicted_kl < best.predicted_kl):
            best = a
    return best


@pytest.mark.parametrize("size", [4501, 5000, 6000, 7500, 9000, 13000])
def test_ilp_finds_the_exact_optimum_within_the_byte_budget(size):
    table = _table()
    got = allocate(table, Budget(size_bytes=size))
    want = _brute_force(table, lambda a: a.weight_bytes <= size)
    assert got.weight_bytes <= size
    assert got.bits == want.bits
    assert got.predicted_kl == pytest.approx(want.predicted_kl)


def test_ilp_meets_average_bits_and_bops_budgets():
    table = _table()
    got = allocate(table, Budget(avg_bits=3.0))
    assert got.avg_bits <= 3.0
    assert got.bits == _brute_force(table, lambda a: a.avg_bits <= 3.0).bits
    bops = evaluate(table, {"a": 4, "b": 2, "c": 8}).bops
    got = allocate(table, Budget(size_bytes=10**6, bops=bops))
    assert got.bops <= bops
    assert got.bits == _brute_force(table, lambda a: a.bops <= bops).bits


def test_pareto_front_trades_size_for_predicted_loss():
    front = pareto_front(_table(), points=30)
    sizes = [a.weight_bytes for a in front]
    losses = [a.predicted_kl for a in front]
    assert sizes == sorted(sizes) and losses == sorted(losses, reverse=True)
    assert front[0].bits == {"a": 2, "b": 2, "c": 2} and front[-1].bits == {"a": 8, "b": 8, "c": 8}


def test_infeasible_budgets_name_the_minimum():
    table = _table()
    smallest = evaluate(table, {"a": 2, "b": 2, "c": 2}).weight_bytes
    with pytest.raises(AllocationError, match=f"at least that.*|{smallest} bytes"):
        allocate(table, Budget(size_bytes=smallest - 1))
    assert allocate(table, Budget(size_bytes=smallest)).weight_bytes == smallest
    with pytest.raises(AllocationError, match="--avg-bits 1.5 is below .* 2.0000"):
        allocate(table, Budget(avg_bits=1.5))
    with pytest.raises(AllocationError, match="needs a budget"):
        Budget()


@pytest.mark.parametrize(
    "override, message",
    [
        ("mixed.w_candidates=[1,4]", "from 2 to 8"),
        ("mixed.w_candidates=[]", "non-empty list"),
        ("mixed.kind_bits={attention: [4]}", "unknown layer kind 'attention'"),
        ("mixed.kind_bits={depthwise: [5]}", "shares no width"),
        ("mixed.size_budget=lots", "positive amount such as 2.5MB"),
        ("mixed.probes=0", "integer ≥ 1"),
    ],
)
def test_bad_bit_sets_and_budgets_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("rtn", [override])


def test_hessian_trace_estimators_match_the_exact_trace_of_a_softmax_layer():
    """For logits z = Wx, the KL's Hessian at the FP point is E_x[(diag p − ppᵀ) ⊗ xxᵀ]: its trace is known exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x = torch.randn(64, 3, 2, 2)
    p = F.softmax(model(x), 1).detach()
    exact = ((p * (1 - p)).sum(1) * x.flatten(1).pow(2).sum(1)).mean().item() / model[1].weight.numel()
    qmodel = prepare(model, QuantConfig(first_last_bits="all"), x[:1])
    batches = list(x.split(16))
    for estimator in ("hutchinson", "fisher"):
        traces, seen = hessian_traces(qmodel, batches, probes=64, estimator=estimator)
        assert seen == 64
        assert traces["1"] == pytest.approx(exact, rel=0.15), estimator


def test_sensitivity_rises_for_a_layer_made_harder_to_quantize(digits_model, digits):
    xtr = digits[0][:64]
    config = MixedConfig(probes=2, images=64)
    quant = QuantConfig()
    base = measure_sensitivity(prepare(digits_model, quant, xtr[:1]), [xtr], "test_resnet", quant, config)
    harder = prepare(digits_model, quant, xtr[:1])
    layer = harder.get_submodule("layer2.0.conv1").layer
    with torch.no_grad():  # one outlier per output channel stretches the range the other weights share
        layer.weight[:, 0, 0, 0] *= 20
    after = measure_sensitivity(harder, [xtr], "test_resnet", quant, config)
    before = {lay.name: lay for lay in base.layers}
    changed = {lay.name: lay for lay in after.layers}["layer2.0.conv1"]
    assert changed.omega(4) > 3 * before["layer2.0.conv1"].omega(4)
    assert [lay.allowed for lay in base.layers][0] == [8]  # the first layer keeps 8 bits (qdrop convention)
    assert all(lay.trace >= 0 for lay in base.layers)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, samples_dir):
    folder = tmp_path_factory.mktemp("photos")
    for p in sorted(samples_dir.glob("*_full.jpg"))[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("ckpt"), "test_efficientnet")


def test_bits_auto_allocates_within_budget_and_round_trips(tmp_path, checkpoint, photos):
    sens = tmp_path / "sens"
    result = runner.invoke(
        app,
        ["sensitivity", "test_efficientnet", "--checkpoint", str(checkpoint), "--calib-data", str(photos),
         "--out", str(sens), "--avg-bits", "3.5", "--device", "cpu", "--set", "mixed.probes=2",
         "--set", "quant.first_last_bits=all"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in sens.iterdir()) == [
        "recipe.yaml", "sensitivity.csv", "sensitivity.json", "sensitivity.png",
    ]  # fmt: skip
    written = json.loads((sens / "sensitivity.json").read_text())
    assert written["chosen"]["avg_bits"] <= 3.5 and len(written["pareto_front"]) > 3
    assert (sens / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"

    budget = written["uniform"]["4"]["weight_bytes"]
    out = tmp_path / "q"
    result = runner.invoke(
        app,
        ["quantize", "--recipe", "rtn",
         "test_efficientnet", "--checkpoint", str(checkpoint), "--calib-data", str(photos),
         "--bits", "auto", "--size-budget", f"{budget}B", "--sensitivity", str(sens), "--out", str(out),
         "--device", "cpu", "--set", "quant.first_last_bits=all"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "weight bits per layer" in result.output
    meta = json.loads((out / "quant_config.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert report["w_bits"] == "auto" and report["a_bits"] == 8
    assert report["mixed"]["weight_bytes"] <= budget
    assert len(set(meta["mixed"]["bits"].values())) > 1  # really mixed
    loaded = load_quantized(out)
    stored = {name: layer.weight_quantizer.bits for name, layer in loaded.named_modules() if hasattr(layer, "layer")}
    assert {n: b for n, b in stored.items() if n in meta["mixed"]["bits"]} == meta["mixed"]["bits"]

    # the same widths, rounded by GPTQ with bias correction: each layer on its own width's grid
    gptq = tmp_path / "g"
    result = runner.invoke(
        app,
        ["quantize", "--recipe", "rtn",
         "test_efficientnet", "--checkpoint", str(checkpoint), "--calib-data", str(photos),
         "--bits", "auto", "--size-budget", f"{budget}B", "--sensitivity", str(sens), "--out", str(gptq),
         "--device", "cpu", "--set", "quant.first_last_bits=all", "--method", "gptq",
         "--set", "quant.bias_correction=empirical"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((gptq / "report.json").read_text())
    assert report["mixed"]["bits"] == meta["mixed"]["bits"] and report["rounding"]["rounding"] == "gptq"
    rows = report["rounding"]["per_layer"]
    assert sum(r["error"] for r in rows) < sum(r["rtn_error"] for r in rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "auto"], "needs a budget"),
        (["--bits", "4", "--avg-bits", "3"], "apply to --bits auto"),
        (["--bits", "auto", "--size-budget", "1KB"], "below the smallest weight size"),
        (["--bits", "auto", "--avg-bits", "3", "--a-bits", "auto"], "--a-bits"),
        (["--bits", "five"], "bit width from 2 to 8 or auto"),
        (["--bits", "auto", "--avg-bits", "3", "--set", "mixed.w_candidates=[4,9]"], "from 2 to 8"),
    ],
)
def test_bits_auto_bad_input_fails_before_writing(tmp_path, checkpoint, photos, args, message):
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["quantize", "--recipe", "rtn",
         "test_efficientnet", "--checkpoint", str(checkpoint), "--calib-data", str(photos),
         "--out", str(out), "--device", "cpu", *args],
    )  # fmt: skip
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    assert not out.exists()
