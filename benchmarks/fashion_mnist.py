"""Fashion-MNIST (Debian package `dataset-fashion-mnist`: 60k train / 10k test, 28×28) and a timm model trained on it.

    apt-get install dataset-fashion-mnist
    python benchmarks/fashion_mnist.py train [--model resnet18] [--epochs 8] [--device cuda]

Training is seeded and writes `benchmarks/weights/fmnist_<model>.safetensors` (not committed), whose header carries the
data config (1×28×28, mean/std of the training set), so `ptq` commands preprocess it correctly.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/usr/share/datasets/fashion-mnist")
WEIGHTS = ROOT / "benchmarks" / "weights"
MEAN, STD = 0.2860, 0.3530  # of the training images, in [0, 1]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (N, 1, 28, 28) and labels for split 'train' or 't10k'."""
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: apt-get install dataset-fashion-mnist")
    images = torch.from_numpy(read_idx(DATA / f"{split}-images-idx3-ubyte.gz").copy()).float().div(255)
    labels = torch.from_numpy(read_idx(DATA / f"{split}-labels-idx1-ubyte.gz").copy()).long()
    return ((images - MEAN) / STD).unsqueeze(1), labels


def data_config() -> dict:
    return {
        "input_size": (1, 28, 28),
        "mean": (MEAN,),
        "std": (STD,),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


def weights_path(model_name: str) -> Path:
    return WEIGHTS / f"fmnist_{model_name}.safetensors"


def trained(device, model_name: str = "resnet18", epochs: int = 8) -> tuple[torch.nn.Module, dict]:
    """The trained model through ptq's loader (as `--checkpoint` would load it) and its data config; trains it
    first when its weights are missing."""
    from ptq.models import load_model

    path = weights_path(model_name)
    if not path.is_file():
        train(model_name, epochs, str(device))
    return load_model(model_name, checkpoint=path, device=device)


def build(model_name: str) -> torch.nn.Module:
    return timm.create_model(model_name, num_classes=10, in_chans=1)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i : i + batch].to(device)).argmax(1).cpu() == y[i : i + batch]).sum())
    return 100.0 * correct / len(y)


def train(model_name: str, epochs: int, device: str, batch: int = 256, lr: float = 2e-3, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    xtr, ytr = load("train")
    xte, yte = load("t10k")
    model = build(model_name).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * (len(ytr) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(len(ytr) // batch):
            idx = perm[i * batch : (i + 1) * batch]
            x = xtr[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5  # horizontal flips: the only augmentation
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x).to(device)
            loss = F.cross_entropy(model(x), ytr[idx].to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(
            f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, test top-1 {accuracy(model, xte, yte, device):.2f}% "
            f"({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    path = weights_path(model_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(
        state,
        str(path),
        metadata={"pretrained_cfg": json.dumps(data_config()), "test_top1": f"{accuracy(model, xte, yte, device):.2f}"},
    )
    print(f"wrote {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    train(args.model, args.epochs, args.device)


if __name__ == "__main__":
    main()
