"""A synthetic set on disk: one safetensors shard per batch, a metadata JSON and a PNG preview.

Each shard holds `images` (normalised float32), `labels` (int64) and the synthesizer's state after that batch (IntraQ's
class centres), and in its header the settings fingerprint, the batch index, the final losses and a SHA-256 of the
image and label bytes. Shards are written atomically; a shard whose header, fingerprint or checksum does not match is
treated as missing and regenerated, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ptq._io import atomic_path

log = logging.getLogger(__name__)
META_FILE = "synth.json"
PREVIEW_FILE = "preview.png"


def shard_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"shard_{index:05d}.safetensors"


def checksum(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def write_shard(
    path: Path,
    index: int,
    fingerprint: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    losses: dict[str, float],
    state: dict[str, torch.Tensor],
) -> None:
    tensors = {"images": images.contiguous(), "labels": labels.to(torch.int64).contiguous(), **state}
    header = {
        "fingerprint": fingerprint,
        "index": str(index),
        "losses": json.dumps(losses),
        "sha256": checksum(tensors["images"], tensors["labels"]),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def read_shard(path: Path, fingerprint: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The shard's tensors and header if it is complete and made with these settings, else None (with the reason)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        log.warning("shard %s is unreadable (%s); it will be regenerated", path.name, e)
        return None
    if header.get("fingerprint") != fingerprint:
        log.warning("shard %s was made with other settings; it will be regenerated", path.name)
        return None
    if (
        "images" not in tensors
        or "labels" not in tensors
        or checksum(tensors["images"], tensors["labels"]) != header.get("sha256")
    ):
        log.warning("shard %s is corrupt (checksum mismatch); it will be regenerated", path.name)
        return None
    return tensors, {"index": int(header["index"]), "losses": json.loads(header["losses"])}


class SyntheticSet(Dataset):
    """The images and labels of a finished synthetic set folder, as a dataset of (image, label)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder} is not a finished synthetic set (no {META_FILE}); run `ptq synthesize`")
        self.meta = json.loads(meta_path.read_text())
        images, labels = [], []
        for index in range(self.meta["num_batches"]):
            shard = read_shard(shard_path(folder, index), self.meta["fingerprint"])
            if shard is None:
                raise FileNotFoundError(f"{shard_path(folder, index)} is missing or corrupt; rerun the same command")
            images.append(shard[0]["images"])
            labels.append(shard[0]["labels"])
        self.images, self.labels = torch.cat(images), torch.cat(labels)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])
