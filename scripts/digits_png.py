"""Write scikit-learn's bundled digits as an ImageFolder of PNG files (real data, no download):
OUT/train/<digit>/<i>.png and OUT/val/<digit>/<i>.png, 80/20 by a fixed seed.

    python scripts/digits_png.py /tmp/digits_png
    dpbp train model=custom model._target_=my_nets.build data=imagefolder data.root=/tmp/digits_png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(out: Path, seed: int = 0) -> None:
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    n_train = int(len(images) * 0.8)
    for rank, i in enumerate(order):
        split = "train" if rank < n_train else "val"
        folder = out / split / str(d.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
    print(f"{n_train} training and {len(images) - n_train} validation images in {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/digits_png.py OUT")
    main(Path(sys.argv[1]))
