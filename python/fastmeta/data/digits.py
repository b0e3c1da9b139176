"""scikit-learn's bundled 8x8 handwritten digits as a small few-shot benchmark (no download)."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from fastmeta.data.images import ClassDataset

SPLITS = {"train": (0, 1, 2, 3, 4, 5), "test": (6, 7, 8, 9)}
ROTATIONS = (0, 90, 180, 270)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.datasets.load_digits()``'s images (float32 ``[1797, 8, 8]`` in [0, 1]) and
    digits, read straight from the CSV file scikit-learn ships (importing scikit-learn itself
    takes seconds); falls back to ``load_digits`` if that file is not where expected."""
    spec = importlib.util.find_spec("sklearn")
    path = None if spec is None or not spec.origin else \
        os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    if path is not None and os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        if table.shape == (1797, 65):
            return table[:, :64].reshape(-1, 8, 8) / 16.0, table[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


class Digits(ClassDataset):
    """The 1,797 8x8 digits of ``sklearn.datasets.load_digits`` as a few-shot class dataset.

    ``split="train"``: digits 0-5, ``split="test"``: digits 6-9; each digit rotated by 0, 90,
    180 and 270 degrees (counter-clockwise) is a class of its own, so 24 training and 16 test
    classes of about 180 images each. Class ``c`` is digit ``SPLITS[split][c // 4]`` rotated by
    ``ROTATIONS[c % 4]`` (names like ``"7/rot90"``); ``groups`` holds the digit.

    There is deliberately no ``"val"`` split: the test classes must stay unseen, and any
    held-out subset of the 24 training classes costs training classes. For validation during
    training, hold out whole digits with ``fastmeta.data.split_classes(Digits("train"), 2)``
    (16 training / 8 validation classes; a digit's four rotations stay on one side, so no
    image leaks across). Note that a 180-degree 6 resembles a 9, so 6/rot180 vs 9/rot0 (and
    9/rot180 vs 6/rot0) are hard pairs in the test split.

    Images are float32 ``[N, 1, 8, 8]`` scaled from 0..16 to [0, 1]; labels int64.
    """

    def __init__(self, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"Digits: split must be one of {tuple(SPLITS)}, got {split!r}")
        images, target = load_digits()
        pixels, labels = [], []
        for i, digit in enumerate(SPLITS[split]):
            own = images[target == digit]
            for j, degrees in enumerate(ROTATIONS):
                pixels.append(np.rot90(own, degrees // 90, axes=(1, 2)))
                labels.append(np.full(len(own), i * len(ROTATIONS) + j))
        pixels = np.ascontiguousarray(np.concatenate(pixels)[:, None])
        digits = SPLITS[split]
        names = [f"{d}/rot{r}" for d in digits for r in ROTATIONS]
        super().__init__(torch.from_numpy(pixels), torch.from_numpy(np.concatenate(labels)),
                         len(names), torch.tensor(digits).repeat_interleave(len(ROTATIONS)), names)
        self.split = split
        self.digits = digits
