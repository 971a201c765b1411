"""Regenerate data/samples/ from photos bundled in PyPI packages (needs scikit-image, scikit-learn and matplotlib).

Each photo is stored at most 384 px on its long side, plus five views of it (four corner crops of 70% side and a
mirror image), so that fidelity metrics are not computed on a handful of images. The views are not independent
photos: treat the set as 11 photos × 6 views. Licences: data/LICENSES.md.
"""

from pathlib import Path

import matplotlib
import numpy as np
import skimage.data
from PIL import Image
from sklearn.datasets import load_sample_image

OUT = Path(__file__).parent / "samples"
LONG_SIDE = 384


def photos() -> dict[str, np.ndarray]:
    sk = {
        name: getattr(skimage.data, name)()
        for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "brick", "clock")
    }
    hopper = np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    return {
        **sk,
        "china": load_sample_image("china.jpg"),
        "flower": load_sample_image("flower.jpg"),
        "grace_hopper": hopper,
    }


def views(image: Image.Image) -> dict[str, Image.Image]:
    w, h = image.size
    cw, ch = int(w * 0.7), int(h * 0.7)
    boxes = {"tl": (0, 0, cw, ch), "tr": (w - cw, 0, w, ch), "bl": (0, h - ch, cw, h), "br": (w - cw, h - ch, w, h)}
    out = {"full": image, "mirror": image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)}
    out.update({k: image.crop(b) for k, b in boxes.items()})
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, array in photos().items():
        image = Image.fromarray(array).convert("RGB")
        image.thumbnail((LONG_SIDE, LONG_SIDE), Image.Resampling.LANCZOS)
        for view, im in views(image).items():
            im.save(OUT / f"{name}_{view}.jpg", quality=90)


if __name__ == "__main__":
    main()
