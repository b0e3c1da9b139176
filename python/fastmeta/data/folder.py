"""Any folder of class sub-folders of images, as a few-shot class dataset."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from fastmeta.data.images import (ClassDataset, DataError, cached_array, check_size,
                                  decode_images, natural_key, resample_filter)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageFolderTasks(ClassDataset):
    """``root/<class>/<image>`` becomes a class dataset: one class per sub-folder (sorted by
    name, numbers numerically; ``class_names`` keeps the folder names), images anywhere below
    it with one of ``extensions``. Hidden files and folders are skipped.

    ``image_size`` (an int or ``(height, width)``) resizes every image with ``resample``;
    with ``None`` all images must already share one size. ``grayscale`` gives 1 channel, else
    3 (RGB); ``invert`` maps ``v -> 255 - v`` (e.g. dark strokes on white -> strokes as 1).
    Pixels are stored as uint8 (``images`` is float32 in [0, 1]); decoding is cached like
    Omniglot's (keyed by every file's path, size and modification time) unless ``cache=False``.
    """

    def __init__(self, root, image_size=None, grayscale: bool = True, invert: bool = False,
                 resample: str = "lanczos", extensions=EXTENSIONS, cache: bool = True,
                 workers: int | None = None):
        size = check_size(image_size)
        resample_filter(resample)
        if isinstance(extensions, str):  # one extension, not its characters
            extensions = (extensions,)
        if (not isinstance(extensions, (tuple, list)) or not extensions
                or not all(isinstance(e, str) and e.startswith(".") and len(e) > 1
                           for e in extensions)):
            raise TypeError(f"extensions must be one or more file extensions like '.png', got "
                            f"{extensions!r}")
        extensions = tuple(e.lower() for e in extensions)
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"no image folder at {root}: expected a folder with one sub-folder "
                            f"of images per class")
        classes = sorted((d for d in os.listdir(root) if not d.startswith(".")
                          and (root / d).is_dir()), key=natural_key)
        paths, labels, signature, empty = [], [], [], []
        for label, name in enumerate(classes):
            found = []
            for directory, subdirs, files in os.walk(root / name):
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
                found += [os.path.join(directory, f) for f in files
                          if not f.startswith(".") and f.lower().endswith(extensions)]
            if not found:
                empty.append(name)
            found.sort(key=natural_key)
            paths += found
            labels += [label] * len(found)
            for path in found:
                try:
                    stat = os.stat(path)
                except OSError as error:  # a broken symbolic link, a link loop
                    raise DataError(f"cannot read the image {path}: {error.strerror}") from None
                signature.append([os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns])
        if not classes:
            raise DataError(f"no image folder at {root}: it has no class sub-folders (expected "
                            f"{root}/<class>/<image>)")
        if empty:
            raise DataError(f"the class folder {root / empty[0]} holds no images with the "
                            f"extensions {', '.join(extensions)}"
                            + (f" ({len(empty) - 1} more empty)" if len(empty) > 1 else ""))
        key = {"dataset": "folder", "source": hashlib.sha256(json.dumps(signature).encode()).hexdigest(),
               "size": size, "grayscale": bool(grayscale), "invert": bool(invert), "resample": resample}

        def build():
            return decode_images(paths, None, size, grayscale, invert, resample, workers), {}

        pixels, _ = cached_array("folder", key, build, cache)
        pixels = pixels[:, None] if grayscale else pixels.transpose(0, 3, 1, 2)
        # Folder names that are not valid UTF-8 keep their bytes as lone surrogates, which
        # nothing can print or plot: shown with replacement characters instead.
        names = [c.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for c in classes]
        super().__init__(torch.from_numpy(np.ascontiguousarray(pixels)),
                         torch.tensor(labels, dtype=torch.int64), len(classes), None, names)
        self.root = root
        self.paths = paths
