"""Image folders: any folder of images read recursively (non-image files skipped), optionally labelled.

Labels come from ImageNet-style class folders: named by WordNet synset id (`n01440764`, mapped to the ImageNet-1k
class index) or by class index (`0`, `1`, ...). Any other layout is unlabelled, which still allows FP-vs-quantized
fidelity metrics. Preprocessing is always timm's eval transform for the model's own data config.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Subset

from ptq.errors import PtqError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif"}
SYNSET = re.compile(r"^n\d{8}$")


class DataError(PtqError, RuntimeError):
    """The data folder is missing, empty or unreadable; the message says how to fix it."""


def find_images(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass a folder of images")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder; pass a folder of images (read recursively)")
    try:
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except PermissionError as e:
        raise DataError(f"data folder {root} is not readable: {e.filename}") from None
    if not images:
        raise DataError(
            f"no images in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); pass a folder of images"
        )
    return images


def infer_labels(root: Path, images: list[Path]) -> list[int] | None:
    """Class indices from class folders named by synset id or class index, else None (unlabelled)."""
    folders = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) == 2 else None for p in images]
    if any(f is None for f in folders):
        return None
    if all(SYNSET.match(f) for f in folders):
        from timm.data import ImageNetInfo

        index = {s: i for i, s in enumerate(ImageNetInfo().label_names())}
        if all(f in index for f in folders):
            return [index[f] for f in folders]
        return None
    if all(f.isdigit() for f in folders):
        return [int(f) for f in folders]
    return None


class ImageFolder(Dataset):
    """Images under `root` with timm's eval transform; items are (image tensor, label or -1)."""

    def __init__(self, root: str | Path, data_config: dict):
        self.root = Path(root)
        self.images = find_images(self.root)
        self.labels = infer_labels(self.root, self.images)
        self.transform = create_transform(**data_config, is_training=False)
        self.mode = "L" if data_config.get("input_size", (3,))[0] == 1 else "RGB"  # grayscale models read grayscale

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.images[i]
        try:
            with Image.open(path) as im:
                image = im.convert(self.mode)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot read image {path} ({type(e).__name__}); remove or replace the file") from None
        return self.transform(image), (self.labels[i] if self.labels is not None else -1)


def make_loader(dataset: Dataset, batch_size: int, workers: int = 0, device: torch.device | str = "cpu") -> DataLoader:
    pin = torch.device(device).type == "cuda"
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin)


def calibration_set(root: str | Path, data_config: dict, num_images: int, seed: int = 0) -> Dataset:
    """At most `num_images` images of the folder, a seeded random subset when there are more."""
    dataset = ImageFolder(root, data_config)
    if len(dataset) <= num_images:
        return dataset
    return Subset(dataset, sorted(random.Random(seed).sample(range(len(dataset)), num_images)))


def image_batches(loader: DataLoader, device: torch.device | str) -> Iterator[torch.Tensor]:
    for images, _ in loader:
        yield images.to(device, non_blocking=True)
