"""Shared fixtures: offline hub, a private cache folder, sample photos, and a small model trained on real digits."""

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("PTQ_CACHE_DIR", tempfile.mkdtemp(prefix="ptq-test-cache-"))

import pytest  # noqa: E402

from ptq._malloc import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as the command line does
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 1,797 real 8×8 digits, upsampled to 32×32 and normalised; a fixed 1,297 / 500 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (F.interpolate(x, size=32, mode="bilinear", align_corners=False) - 0.5) / 0.5
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1297], perm[1297:]
    return x[train], y[train], x[test], y[test]


@pytest.fixture(scope="session")
def digits_model(digits):
    """timm's test_resnet trained for a few seconds on the digits (about 98% test accuracy)."""
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=0.0)
    model.train()
    for _ in range(5):
        for i in range(0, len(ytr), 64):
            loss = F.cross_entropy(model(xtr[i : i + 64]), ytr[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def random_bn_stats(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give a randomly initialised model non-trivial BatchNorm statistics, so folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model.eval()


def random_checkpoint(folder: Path, name: str) -> Path:
    """Weights of a seeded random timm `name` with non-trivial BN statistics, saved as `folder/name.safetensors`."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = folder / f"{name}.safetensors"
    save_file(random_bn_stats(timm.create_model(name)).state_dict(), str(path))
    return path
