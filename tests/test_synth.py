"""Zero-shot synthesis on a model with real BatchNorm statistics (test_resnet trained on the digits)."""

import pytest
import timm
import torch
from typer.testing import CliRunner

from ptq.config import SynthConfig
from ptq.synth import SynthError, Synthesizer, SyntheticSet, class_statistics, synthesize
from ptq.synth.augment import random_resized_crop
from ptq.synth.run import batch_sizes
from ptq.synth.shards import read_shard, shard_path, write_shard
from ptq.synth.stats import BNStatistics

SIZE = (1, 32, 32)
DATA_CONFIG = {"input_size": SIZE, "mean": (0.5,), "std": (0.5,)}


def _gap(model, x):
    """Mean over BN layers of the relative distance between the batch statistics of x and the running statistics."""
    stats = BNStatistics(model)
    with torch.no_grad(), stats:
        model(x)
    pairs = zip(stats.moments(), stats.running(), strict=True)
    gaps = [
        ((a - b).norm() / b.norm().clamp_min(1e-3)).item()
        for ours, target in pairs
        for a, b in zip(ours.split(stats.channels, dim=-1), target.split(stats.channels, dim=-1), strict=True)
    ]
    return sum(gaps) / len(gaps)


def test_bns_loss_falls_and_statistics_approach_the_running_ones(digits_model):
    config = SynthConfig(method="bns", iters=1, batch_size=32)
    start = Synthesizer(digits_model, SIZE, config).batch(0, 32)
    config = SynthConfig(method="bns", iters=150, batch_size=32)
    end = Synthesizer(digits_model, SIZE, config).batch(0, 32)
    assert end.losses["bns"] < start.losses["bns"] / 10
    assert _gap(digits_model, end.images) < _gap(digits_model, start.images) / 3


def test_bn_hooks_match_var_mean_per_batch_and_per_sample(digits_model):
    x = torch.randn(4, *SIZE)
    inputs = {}
    for per_sample in (False, True):
        stats = BNStatistics(digits_model, per_sample=per_sample)
        first = stats.layers[0][1]
        handle = first.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0].clone()))
        with torch.no_grad(), stats:
            digits_model(x)
        handle.remove()
        mean, var = stats.moments()
        total = sum(stats.channels)
        assert mean.shape == ((4, total) if per_sample else (total,))
        ref_var, ref_mean = torch.var_mean(inputs["x"], dim=(2, 3) if per_sample else (0, 2, 3), unbiased=False)
        c = first.num_features
        assert torch.allclose(mean[..., :c], ref_mean, atol=1e-5) and torch.allclose(var[..., :c], ref_var, atol=1e-4)
    assert not first._forward_hooks  # hooks are removed afterwards


def test_batched_crop_is_differentiable_keeps_shape_and_is_seeded():
    x = torch.randn(6, 3, 20, 24, requires_grad=True)
    a = random_resized_crop(x, 0.5, torch.Generator().manual_seed(0))
    b = random_resized_crop(x, 0.5, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    a.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not torch.allclose(a, x)


@pytest.mark.parametrize("method", ["intraq", "fdda"])
def test_class_conditional_methods_raise_the_target_class_probability(digits_model, digits, method):
    xtr, ytr, _, _ = digits
    stats = None
    if method == "fdda":
        one_per_class = torch.stack([xtr[(ytr == c).nonzero()[0, 0]] for c in range(10)])
        stats = class_statistics(digits_model, one_per_class, torch.arange(10))
    config = SynthConfig(method=method, iters=120, batch_size=16, classes=[3] if method == "intraq" else None)
    synth = Synthesizer(digits_model, SIZE, config, class_stats=stats)
    init = torch.randn(16, *SIZE, generator=torch.Generator().manual_seed(5))
    batch = synth.batch(3, 16)
    target = int(batch.labels[0])
    assert (batch.labels == target).all()
    with torch.no_grad():
        before = digits_model(init).softmax(1)[:, target].mean()
        after = digits_model(batch.images).softmax(1)[:, target].mean()
    assert after > 0.5 and after > before + 0.3


def test_resume_after_interruption_equals_an_uninterrupted_run(digits_model, tmp_path, monkeypatch):
    config = SynthConfig(method="intraq", num_images=20, batch_size=8, iters=15, seed=3)
    whole = synthesize(digits_model, "test_resnet", DATA_CONFIG, config, tmp_path / "whole")
    original = Synthesizer.batch

    def interrupted(self, index, size, step=None):
        if index == 1:
            raise KeyboardInterrupt
        return original(self, index, size, step)

    monkeypatch.setattr(Synthesizer, "batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthesize(digits_model, "test_resnet", DATA_CONFIG, config, tmp_path / "resumed")
    assert shard_path(tmp_path / "resumed", 0).is_file() and not shard_path(tmp_path / "resumed", 1).exists()
    monkeypatch.setattr(Synthesizer, "batch", original)
    meta = synthesize(digits_model, "test_resnet", DATA_CONFIG, config, tmp_path / "resumed")
    assert meta["resumed_batches"] == 1 and meta["num_batches"] == 3
    a, b = SyntheticSet(tmp_path / "whole"), SyntheticSet(tmp_path / "resumed")
    assert len(a) == 20 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert meta["batch_losses"] == whole["batch_losses"]
    assert (tmp_path / "resumed" / "preview.png").stat().st_size > 0


def test_corrupt_shard_is_detected_and_regenerated(digits_model, tmp_path):
    config = SynthConfig(method="bns", num_images=16, batch_size=8, iters=5)
    synthesize(digits_model, "test_resnet", DATA_CONFIG, config, tmp_path)
    reference = SyntheticSet(tmp_path).images.clone()
    path = shard_path(tmp_path, 1)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the image data
    path.write_bytes(bytes(data))
    assert read_shard(path, _fingerprint(tmp_path)) is None
    meta = synthesize(digits_model, "test_resnet", DATA_CONFIG, config, tmp_path)
    assert meta["resumed_batches"] == 1
    assert torch.equal(SyntheticSet(tmp_path).images, reference)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert synthesize(digits_model, "test_resnet", DATA_CONFIG, config, tmp_path)["resumed_batches"] == 1


def _fingerprint(folder):
    import json

    return json.loads((folder / "synth.json").read_text())["fingerprint"]


def test_shards_round_trip(tmp_path):
    images, labels = torch.randn(3, 1, 4, 4), torch.tensor([1, 2, 3])
    state = {"centre_sums": torch.ones(2, 5), "centre_counts": torch.ones(2)}
    write_shard(tmp_path / "s.safetensors", 7, "abc", images, labels, {"total": 0.5}, state)
    tensors, header = read_shard(tmp_path / "s.safetensors", "abc")
    assert torch.equal(tensors["images"], images) and torch.equal(tensors["labels"], labels)
    assert torch.equal(tensors["centre_sums"], state["centre_sums"])
    assert header == {"index": 7, "losses": {"total": 0.5}}
    assert read_shard(tmp_path / "s.safetensors", "other settings") is None


def test_num_images_need_not_be_a_multiple_of_the_batch():
    assert batch_sizes(20, 8) == [8, 8, 4] and batch_sizes(16, 8) == [8, 8] and batch_sizes(3, 8) == [3]


def test_models_without_batchnorm_and_fdda_without_real_images_error_clearly(digits_model):
    vit = timm.create_model("test_vit").eval()
    with pytest.raises(SynthError, match="no BatchNorm layers.*bns, intraq, fdda, genie.*--calib-data"):
        Synthesizer(vit, (3, 160, 160), SynthConfig())
    with pytest.raises(SynthError, match="pass --calib-data"):
        Synthesizer(digits_model, SIZE, SynthConfig(method="fdda"))


def test_genie_generator_path_runs_and_lowers_bns(digits_model):
    one = Synthesizer(digits_model, SIZE, SynthConfig(method="genie", iters=1)).batch(0, 8)
    many = Synthesizer(digits_model, SIZE, SynthConfig(method="genie", iters=60)).batch(0, 8)
    assert many.images.shape == (8, *SIZE)
    assert many.losses["bns"] < one.losses["bns"]


runner = CliRunner()


def test_cli_synthesize_then_quantize_zero_shot(tmp_path, samples_dir):
    from safetensors.torch import save_file

    from ptq.cli import app

    torch.manual_seed(0)
    ckpt = tmp_path / "w.safetensors"
    save_file(timm.create_model("test_efficientnet").state_dict(), str(ckpt))
    synth = tmp_path / "synth"
    args = [
        "synthesize",
        "test_efficientnet",
        "--checkpoint",
        str(ckpt),
        "--method",
        "bns",
        "--num-images",
        "6",
        "--batch-size",
        "4",
        "--iters",
        "3",
        "--out",
        str(synth),
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in synth.iterdir()) == [
        "preview.png",
        "shard_00000.safetensors",
        "shard_00001.safetensors",
        "synth.json",
    ]
    result = runner.invoke(app, args)  # rerun: everything resumed, nothing redone
    assert result.exit_code == 0 and "2 of 2 batches resumed" in " ".join(result.output.split())
    changed = [*args[:-4], "--iters", "4", "--out", str(synth), "--device", "cpu"]
    result = runner.invoke(app, changed)
    assert result.exit_code != 0 and "other settings" in " ".join(result.output.split())
    out = tmp_path / "q"
    result = runner.invoke(
        app,
        [
            "quantize",
            "--recipe",
            "rtn",
            "test_efficientnet",
            "--checkpoint",
            str(ckpt),
            "--bits",
            "8",
            "--zero-shot",
            "--synth-data",
            str(synth),
            "--eval-data",
            str(samples_dir),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["data"] == "synthetic" and report["calibration"]["images"] == 6
    assert report["evaluation"]["images"] == 66
    # an unwritable --out fails before any work
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(app, [*args[:-4], "--out", str(blocker / "sub"), "--device", "cpu"])
    assert result.exit_code != 0 and "--out" in result.output


@pytest.mark.parametrize("compiled", [False, True])
def test_channel_sums_and_fused_batchnorm_have_the_right_gradients(compiled, monkeypatch):
    from ptq.synth import stats as stats_module
    from ptq.synth.stats import ChannelSums, FusedBatchNorm

    monkeypatch.setattr(stats_module, "COMPILED_FROM", 0 if compiled else 10**9)

    x = torch.randn(3, 4, 5, 6, dtype=torch.double).requires_grad_()
    s1, s2 = ChannelSums.apply(x)
    assert torch.allclose(s1, x.sum((2, 3))) and torch.allclose(s2, x.square().sum((2, 3)))
    assert torch.autograd.gradcheck(ChannelSums.apply, (x,))
    scale, shift = torch.randn(4, dtype=torch.double), torch.randn(4, dtype=torch.double)
    y, f1, f2 = FusedBatchNorm.apply(x, scale, shift)
    assert (
        torch.allclose(y, x * scale.view(4, 1, 1) + shift.view(4, 1, 1))
        and torch.allclose(f1, s1)
        and torch.allclose(f2, s2)
    )
    assert torch.autograd.gradcheck(lambda t: FusedBatchNorm.apply(t, scale, shift), (x,))
    assert torch.autograd.gradcheck(lambda t: FusedBatchNorm.apply(t, scale, shift)[2], (x,))  # g_y and g1 absent


@pytest.mark.parametrize("shape", [(8, 6, 7, 5), (8, 6)])
def test_compiled_fused_batchnorm_kernels_equal_their_eager_form(shape):
    from ptq.synth.stats import _normalize_and_sum, _normalize_and_sum_backward

    torch.manual_seed(0)
    x, gy = torch.randn(shape), torch.randn(shape)
    channel, per_image = (-1,) + (1,) * (len(shape) - 2), shape[:2] + (1,) * (len(shape) - 2)
    scale, shift = torch.randn(6).view(channel), torch.randn(6).view(channel)
    g1, g2 = torch.randn(per_image), torch.randn(per_image)
    for got, want in zip(_normalize_and_sum(x, scale, shift), _normalize_and_sum.eager(x, scale, shift), strict=True):
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    got = _normalize_and_sum_backward(gy, x, scale, g1, g2)
    assert torch.allclose(got, _normalize_and_sum_backward.eager(gy, x, scale, g1, g2), rtol=1e-5, atol=1e-6)
    assert torch.allclose(got, gy * scale + g1 + 2 * x * g2, rtol=1e-5, atol=1e-6)


def test_fused_and_hooked_batchnorms_give_the_same_statistics_and_input_gradient(monkeypatch):
    """timm's BatchNormAct2d (act after BN) is fused; a frozen BN computing x·a + b itself is read by the hook."""
    from timm.layers.norm_act import FrozenBatchNormAct2d

    from ptq.synth import stats as stats_module

    calls = {"fused": 0, "hooked": 0}
    for name, key in (("FusedBatchNorm", "fused"), ("ChannelSums", "hooked")):
        cls = getattr(stats_module, name)

        def counted(*args, apply=cls.apply, key=key):
            calls[key] += 1
            return apply(*args)

        monkeypatch.setattr(cls, "apply", counted)

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=10).eval().requires_grad_(False)
    for m in model.modules():
        if hasattr(m, "running_var"):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    frozen_bn = FrozenBatchNormAct2d(model.bn1.num_features, act_layer=torch.nn.SiLU)
    frozen_bn.load_state_dict(model.bn1.state_dict(), strict=False)
    model.bn1 = frozen_bn
    x = torch.randn(2, 3, 64, 64)
    results = []
    for fuse in (False, True):
        stats = BNStatistics(model, fuse=fuse)
        xg = x.clone().requires_grad_()
        with stats:
            logits = model(xg)
        mean, var = stats.moments()
        (mean.square().sum() + var.sum() + logits.square().mean()).backward()
        results.append((logits, mean, var, xg.grad))
        n = len(stats)
        assert calls == ({"fused": 0, "hooked": n} if not fuse else {"fused": n - 1, "hooked": n + 1})
    for unfused, fused in zip(*results, strict=True):
        assert torch.allclose(fused, unfused, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # and both match var_mean of the inputs the layers actually saw
        seen = {}
        handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0])) for n, m in stats.layers]
        model(x)
        for h in handles:
            h.remove()
    ref = [torch.var_mean(seen[n], dim=(0, 2, 3), unbiased=False) for n, _ in stats.layers]
    assert torch.allclose(results[1][1].detach(), torch.cat([m for _, m in ref]), rtol=1e-4, atol=1e-5)
    assert torch.allclose(results[1][2].detach(), torch.cat([v for v, _ in ref]), rtol=1e-4, atol=1e-4)
    assert not any(m._forward_hooks for _, m in stats.layers)


def test_refused_synthesis_creates_no_folder(digits_model, tmp_path):
    with pytest.raises(SynthError):
        synthesize(digits_model, "test_resnet", DATA_CONFIG, SynthConfig(method="fdda"), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_cached_synthetic_set_serves_the_requested_number_of_images(tmp_path, samples_dir, monkeypatch):
    """Zero-shot runs without --synth-data share a cached set: a larger request grows it, a smaller one uses its
    first images — never silently a different count."""
    import json

    from conftest import random_checkpoint

    from ptq.cli import app

    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = random_checkpoint(tmp_path, "test_efficientnet")

    def images(n):
        out = tmp_path / f"q{n}"
        result = runner.invoke(
            app,
            ["quantize", "--recipe", "rtn",
             "test_efficientnet", "--checkpoint", str(ckpt), "--bits", "8", "--zero-shot",
             "--synth-method", "bns", "--num-images", str(n), "--set", "synth.iters=2", "--set", "synth.batch_size=4",
             "--out", str(out), "--device", "cpu", "--overwrite"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        return json.loads((out / "report.json").read_text())["calibration"]

    assert images(4)["images"] == 4
    grown = images(8)
    assert grown["images"] == 8 and grown["synthetic"]["resumed_batches"] == 1
    assert images(4)["images"] == 4


def test_later_rounds_use_the_class_centres(digits_model, tmp_path):
    config = SynthConfig(method="intraq", num_images=16, batch_size=4, iters=3, classes=[1, 7], mdc_lower=0.9)
    meta = synthesize(digits_model, "test_resnet", DATA_CONFIG, config, tmp_path)
    assert meta["batch_losses"][0]["mdc"] == 0 < meta["batch_losses"][3]["mdc"]  # batch 0 has no centres yet


def test_a_diverging_batch_falls_back_on_its_best_state(digits_model, caplog):
    """A window in which the loss blows up (a term pushing every pixel up for iterations 61-80) is undone."""

    def final(divergence, spike):
        config = SynthConfig(method="bns", iters=200, batch_size=8, divergence=divergence)
        synth = Synthesizer(digits_model, SIZE, config)
        loss, calls = synth._loss, [0]

        def spiked(x, *args):
            parts = loss(x, *args)
            calls[0] += 1
            if spike and 60 < calls[0] <= 80:
                parts["total"] = parts["total"] + 1e3 * (100 - x.mean())
            return parts

        synth._loss = spiked
        return synth.batch(0, 8).losses["bns"]

    clean = final(4.0, spike=False)
    assert clean == final(0, spike=False)  # a run that does not diverge is untouched by the guard
    assert final(0, spike=True) > 100 * clean
    assert "diverged" not in caplog.text
    assert final(4.0, spike=True) < 5 * clean
    assert "synthesis batch 0: the loss diverged at iteration 80" in caplog.text and "synth.lr" in caplog.text


def test_restoring_the_best_state_brings_back_parameters_and_adam_moments_and_cuts_the_lr():
    from ptq.synth.synthesizer import _Best

    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.Adam([p], lr=0.5)
    p.sum().backward()
    opt.step()
    best = _Best(opt)
    best.keep(1.0)
    saved = p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()
    best.keep(2.0)  # worse: not kept
    for _ in range(3):
        (p**3).sum().backward()
        opt.step()
    assert not torch.equal(p.detach(), saved[0])
    best.restore(factor=0.1, min_lr=0.1)
    assert torch.equal(p.detach(), saved[0])
    assert torch.equal(opt.state[p]["exp_avg"], saved[1]) and torch.equal(opt.state[p]["exp_avg_sq"], saved[2])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # 0.05 held at min_lr


def test_marginal_distance_counts_only_images_whose_class_has_a_centre():
    from ptq.synth.losses import marginal_distance_loss

    torch.manual_seed(0)
    features, centres = torch.randn(6, 5, requires_grad=True), torch.randn(3, 5)
    labels, valid = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([True, False, True])
    centres[1] = 0  # a class without a centre has a zero sum
    loss = marginal_distance_loss(features, labels, centres, valid, 0.2, 0.5)
    keep = valid[labels]
    d = 1 - torch.nn.functional.cosine_similarity(features[keep], centres[labels[keep]], dim=1)
    assert torch.allclose(loss, ((0.2 - d).relu() + (d - 0.5).relu()).mean())
    loss.backward()
    assert features.grad[~keep].abs().sum() == 0 and torch.isfinite(features.grad).all()
    none = marginal_distance_loss(features, labels, centres, torch.zeros(3, dtype=torch.bool), 0.2, 0.5)
    assert none.item() == 0


def test_two_checkpoints_of_one_architecture_get_two_synthetic_sets(tmp_path, samples_dir, monkeypatch):
    """The cached set is keyed by the weights: a second checkpoint of the same architecture synthesizes its own set
    instead of calibrating on the first one's images."""
    import json

    from conftest import random_bn_stats
    from safetensors.torch import save_file

    from ptq.cli import app

    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"w{seed}.safetensors"
        save_file(random_bn_stats(timm.create_model("test_efficientnet"), seed).state_dict(), str(path))
        paths.append(path)

    def calibration(path, out):
        result = runner.invoke(
            app,
            ["quantize", "--recipe", "rtn",
             "test_efficientnet", "--checkpoint", str(path), "--bits", "8", "--zero-shot",
             "--synth-method", "bns", "--num-images", "4", "--set", "synth.iters=2", "--set", "synth.batch_size=4",
             "--out", str(tmp_path / out), "--device", "cpu"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / out / "report.json").read_text())["calibration"]["synthetic"]

    first, second = calibration(paths[0], "a"), calibration(paths[1], "b")
    assert first["folder"] != second["folder"] and first["fingerprint"] != second["fingerprint"]
    assert second["resumed_batches"] == 0  # synthesized for the second model, not reused
    assert calibration(paths[0], "c")["folder"] == first["folder"]  # the first model's set is still reused
    result = runner.invoke(
        app,
        ["quantize", "--recipe", "rtn",
         "test_efficientnet", "--checkpoint", str(paths[1]), "--bits", "8", "--zero-shot",
         "--synth-data", first["folder"], "--out", str(tmp_path / "d"), "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code != 0 and "other weights" in result.output and not (tmp_path / "d").exists()
