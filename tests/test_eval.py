import math

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from ptq.data import DataError, ImageFolder, find_images
from ptq.eval.harness import evaluate, expand_specs
from ptq.eval.metrics import MetricSums


def test_metrics_from_known_logits():
    fp = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    q = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    sums = MetricSums()
    sums.update(q, labels, fp)
    s = sums.summary()
    assert s["top1"] == 50.0 and s["top5"] == 100.0 and s["agreement"] == 50.0
    expected_noise = (fp - q).pow(2).sum().item()
    assert math.isclose(s["sqnr_db"], 10 * math.log10(fp.pow(2).sum().item() / expected_noise))
    p, lq = fp.log_softmax(1), q.log_softmax(1)
    assert math.isclose(s["kl"], (p.exp() * (p - lq)).sum().item() / 2, rel_tol=1e-6)


def test_metric_sums_merge_exactly():
    torch.manual_seed(0)
    fp, q, y = torch.randn(10, 5), torch.randn(10, 5), torch.randint(0, 5, (10,))
    whole, a, b = MetricSums(), MetricSums(), MetricSums()
    whole.update(q, y, fp)
    a.update(q[:3], y[:3], fp[:3])
    b.update(q[3:], y[3:], fp[3:])
    merged = a.merge(b)
    assert merged.top1 == whole.top1 and merged.agree == whole.agree
    assert math.isclose(merged.kl, whole.kl) and math.isclose(merged.noise, whole.noise)


def _labelled_folder(root, classes=3, per_class=2):
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(40, 40, 3, generator=g) * 255).byte().numpy()
            Image.fromarray(arr).save(root / str(c) / f"{i}.png")
    (root / "0" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_reads_recursively_with_class_index_labels(tmp_path):
    root = _labelled_folder(tmp_path / "d")
    ds = ImageFolder(root, {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear"})
    assert len(ds) == 6 and ds.labelled and ds.labels == [0, 0, 1, 1, 2, 2]
    assert ds[0][0].shape == (3, 32, 32)


def test_synset_folders_map_to_imagenet_indices(tmp_path):
    (tmp_path / "n01440764").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "n01440764" / "a.jpg")
    (tmp_path / "n15075141").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "n15075141" / "b.jpg")
    assert ImageFolder(tmp_path, {"input_size": (3, 8, 8)}).labels == [0, 999]


def test_bad_data_folders_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(DataError, match="no images"):
        find_images(tmp_path / "empty")


def test_batch_evaluation_matches_direct_computation_and_survives_failures(tmp_path, monkeypatch):
    root = _labelled_folder(tmp_path / "d", classes=4, per_class=3)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4).eval()
    ckpt = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(ckpt))
    from ptq.eval import harness

    ds = ImageFolder(root, timm.data.resolve_model_data_config(model))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        top1 = 100.0 * (model(x).argmax(1) == torch.tensor(ds.labels)).float().mean().item()
    original = harness.load_model
    monkeypatch.setattr(harness, "load_model", lambda name, device="cpu", **kw: original(name, ckpt, device=device))
    rows = evaluate(["test_resnet", "no_such_model_xyz"], root, batch_size=5)
    assert rows[0]["error"] is None and math.isclose(rows[0]["top1"], top1, abs_tol=1e-6)
    assert rows[0]["images"] == 12 and rows[0]["agreement"] is None
    assert rows[1]["error"] and rows[1]["top1"] is None


def test_wildcards_expand_over_timm_names():
    names = expand_specs(["tf_efficientnet_lite[01]", "resnet18"])
    assert names == ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "resnet18"]
