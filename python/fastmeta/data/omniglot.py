"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015): 1,623 handwritten characters from 50
alphabets, 20 drawings each, read from the standard ``images_background.zip`` /
``images_evaluation.zip`` or the folders they unpack to."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from fastmeta.data.images import (ClassDataset, DataError, cached_array, check_size,
                                  decode_images, file_signature, natural_key, open_zip,
                                  resample_filter)

PARTS = ("background", "evaluation")
#: (characters, drawings per character) of the published archives
STANDARD_SHAPES = {"background": (964, 20), "evaluation": (659, 20)}
SPLITS = ("train", "test", "background", "evaluation")
PROTOCOLS = ("vinyals", "lake")
NATIVE_SIZE = 105
ENV = "FASTMETA_DATA"


class Omniglot(ClassDataset):
    """The Omniglot characters as a class dataset for :class:`fastmeta.data.TaskSampler`.

    ``root``: the folder holding ``images_background.zip`` and ``images_evaluation.zip``
    (or the ``images_background/`` and ``images_evaluation/`` folders they unpack to), or a
    folder with an ``omniglot/`` sub-folder holding them; default ``$FASTMETA_DATA``.

    Protocols (``protocol=None`` picks ``"lake"`` for the splits ``"background"`` and
    ``"evaluation"`` and ``"vinyals"`` otherwise):

    * ``"vinyals"`` (Vinyals et al. 2016; the MAML split, Finn et al. 2017): all 1,623
      characters in a fixed order -- the background archive's, then the evaluation
      archive's; in each, alphabets sorted by name, characters by number -- the first
      ``train_characters`` (1,200) for ``split="train"``, the remaining 423 for
      ``split="test"``; each character rotated by 0, 90, 180 and 270 degrees
      (counter-clockwise) to make four classes: 4,800 / 1,692 classes. The 1,200 are all 964
      background characters and the first 236 of the evaluation archive (its alphabets
      Angelic ... Glagolitic and 41 of Gurmukhi's 45), so the test characters come from
      alphabets almost never seen in training.
    * ``"lake"`` (Lake et al. 2015): ``"train"``/``"background"`` = the 964 background
      characters, ``"test"``/``"evaluation"`` = the 659 evaluation characters, unrotated.

    ``rotations`` overrides the protocol's (a tuple of multiples of 90). Class ``c`` is
    character ``c // len(rotations)`` rotated by ``rotations[c % len(rotations)]``; its
    name is ``"<Alphabet>/<characterNN>/rot<degrees>"``; ``groups`` holds the character, so
    :func:`fastmeta.data.split_classes` keeps a character's rotations together.

    Images are resized from 105x105 to ``image_size`` (default 28; None keeps 105) with
    ``resample`` (default ``"lanczos"``, as in the MAML code; ``"box"`` averages areas) and
    inverted, so strokes are 1 and background 0; stored as uint8 (``images`` is float32 in
    [0, 1]). Decoding all 32,460 PNGs takes a few seconds (a process pool of ``workers``,
    default one per CPU); the result is cached per archive under ``$FASTMETA_CACHE`` (default
    ``~/.cache/fastmeta``), keyed by the archives' names, sizes and modification times and
    the image size, so later loads take a fraction of a second. ``cache=False`` skips it.

    A missing or unreadable path raises one :class:`fastmeta.data.DataError` naming it.
    """

    def __init__(self, root=None, split: str = "train", image_size: int | None = 28,
                 protocol: str | None = None, rotations=None, train_characters: int = 1200,
                 resample: str = "lanczos", cache: bool = True, workers: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"Omniglot: split must be one of {SPLITS}, got {split!r}")
        if protocol is None:
            protocol = "lake" if split in ("background", "evaluation") else "vinyals"
        if protocol not in PROTOCOLS:
            raise ValueError(f"Omniglot: protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if protocol == "vinyals" and split in ("background", "evaluation"):
            raise ValueError(f"Omniglot: split={split!r} belongs to protocol='lake'; the vinyals "
                             f"protocol's splits are 'train' and 'test'")
        size = check_size(image_size)
        resample_filter(resample)
        if rotations is None:
            rotations = (0, 90, 180, 270) if protocol == "vinyals" else (0,)
        rotations = tuple(rotations)
        if not rotations or any(isinstance(r, bool) or not isinstance(r, int) or r % 90
                                for r in rotations) or len(set(r % 360 for r in rotations)) != len(rotations):
            raise ValueError(f"Omniglot: rotations must be distinct multiples of 90 degrees, got {rotations!r}")
        if isinstance(train_characters, bool) or not isinstance(train_characters, int) or train_characters < 1:
            raise ValueError(f"Omniglot: train_characters must be a positive integer, got {train_characters!r}")

        root = locate(root)
        if protocol == "lake":
            parts = ("background",) if split in ("train", "background") else ("evaluation",)
        else:
            parts = PARTS
        sources = {part: find_part(root, part) for part in parts}
        missing = [p for p, s in sources.items() if s is None]
        if missing:
            wanted = " and ".join(f"images_{p}.zip" for p in missing)
            unpack = "the folders they unpack to" if len(missing) > 1 else "the folder it unpacks to"
            raise DataError(f"no Omniglot data at {root}: expected {wanted} (or {unpack}); "
                            f"set {ENV} or pass root=")
        pixels, characters = [], []
        for part in parts:
            array, names = load_part(sources[part], part, size, resample, cache, workers)
            if array.shape[:2] != STANDARD_SHAPES[part]:
                # (a partial copy would silently shift the vinyals split, made by count)
                warnings.warn(f"fastmeta: {sources[part]} holds {array.shape[0]} characters of "
                              f"{array.shape[1]} drawings, the standard images_{part} "
                              f"{STANDARD_SHAPES[part][0]} of {STANDARD_SHAPES[part][1]}: a partial "
                              f"or modified copy, so the splits are not the standard ones",
                              stacklevel=2)
            pixels.append(array)
            characters += names
        if len({p.shape[1:] for p in pixels}) > 1:
            raise DataError(f"the Omniglot archives at {root} differ in drawings per character or "
                            f"image size: {[tuple(p.shape[1:]) for p in pixels]}")
        pixels = np.concatenate(pixels) if len(pixels) > 1 else pixels[0]   # [chars, 20, H, W]

        if protocol == "vinyals":
            if train_characters >= len(characters):
                raise DataError(f"Omniglot data at {root} has {len(characters)} characters, too few "
                                f"for a vinyals split with train_characters={train_characters}")
            chosen = slice(0, train_characters) if split == "train" else slice(train_characters, None)
            pixels, characters = pixels[chosen], characters[chosen]

        chars, drawers = pixels.shape[:2]
        rotated = np.stack([np.rot90(pixels, (r // 90) % 4, axes=(2, 3)) for r in rotations], axis=1)
        rotated = rotated.reshape(chars * len(rotations) * drawers, 1, *rotated.shape[-2:])
        labels = np.repeat(np.arange(chars * len(rotations)), drawers)
        names = [f"{c}/rot{r % 360}" for c in characters for r in rotations]
        super().__init__(torch.from_numpy(np.ascontiguousarray(rotated)), torch.from_numpy(labels),
                         chars * len(rotations), torch.arange(chars).repeat_interleave(len(rotations)),
                         names)
        self.root, self.split, self.protocol, self.rotations = root, split, protocol, rotations
        self.characters = characters
        self.sources = [str(sources[p]) for p in parts]


def locate(root) -> Path:
    """The folder holding the Omniglot archives: ``root`` or ``$FASTMETA_DATA``, or its
    ``omniglot/`` sub-folder when the archives are there."""
    if root is None:
        root = os.environ.get(ENV)
        if not root:
            raise DataError(f"no Omniglot data location: pass root= (the folder holding "
                            f"images_background.zip and images_evaluation.zip) or set {ENV}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"no Omniglot data at {root}: the path does not exist (expected a folder "
                        f"holding images_background.zip and images_evaluation.zip, or the folders "
                        f"they unpack to); set {ENV} or pass root=")
    if not root.is_dir():
        raise DataError(f"no Omniglot data at {root}: not a folder (expected a folder holding "
                        f"images_background.zip and images_evaluation.zip); set {ENV} or pass root=")
    if all(find_part(root, p) is None for p in PARTS) and (root / "omniglot").is_dir():
        return root / "omniglot"
    return root


def find_part(root: Path, part: str) -> Path | None:
    """``images_<part>.zip`` in ``root``, else the folder ``images_<part>/`` (or the doubly
    nested ``images_<part>/images_<part>/`` some unzip tools make), else None."""
    archive = root / f"images_{part}.zip"
    if archive.is_file():
        return archive
    folder = root / f"images_{part}"
    if (folder / f"images_{part}").is_dir():
        folder = folder / f"images_{part}"
    return folder if folder.is_dir() else None


def _layout(paths, where) -> tuple[list[str], list[str]]:
    """Groups ``.../<alphabet>/<character>/<file>.png`` paths by character, in the fixed
    order (alphabets by name, characters and files by number); returns the sorted paths
    and the ``alphabet/character`` names, checking every character has the same count."""
    characters: dict[tuple[str, str], list[str]] = {}
    for path in paths:
        parts = path.replace("\\", "/").split("/")
        if len(parts) < 3 or not parts[-1].lower().endswith(".png"):
            continue
        if any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue
        characters.setdefault((parts[-3], parts[-2]), []).append(path)
    if not characters:
        raise DataError(f"{where} holds no Omniglot images: expected "
                        f"<alphabet>/<character>/<drawing>.png files inside")
    keys = sorted(characters, key=lambda k: (natural_key(k[0]), natural_key(k[1])))
    counts = {len(characters[k]) for k in keys}
    if len(counts) > 1:
        low = min(keys, key=lambda k: len(characters[k]))
        raise DataError(f"{where}: characters have different numbers of drawings ({sorted(counts)}); "
                        f"{'/'.join(low)} has {len(characters[low])}")
    ordered = [p for k in keys for p in sorted(characters[k], key=lambda p: natural_key(p.rsplit("/", 1)[-1]))]
    return ordered, [f"{a}/{c}" for a, c in keys]


def load_part(source: Path, part: str, size, resample: str, cache: bool,
              workers) -> tuple[np.ndarray, list[str]]:
    """One archive's characters, decoded: uint8 ``[characters, drawings, H, W]`` and names."""
    if source.suffix == ".zip":
        # The key needs only the archive's size and mtime: a cache hit never opens it.
        signature, container, listing = file_signature(source), source, None
    else:
        listing, signature = [], []
        for directory, subdirs, files in os.walk(source):
            subdirs.sort()
            for name in sorted(files):
                path = os.path.join(directory, name)
                if name.lower().endswith(".png"):
                    listing.append(path)
                    stat = os.stat(path)
                    signature.append([os.path.relpath(path, source), stat.st_size, stat.st_mtime_ns])
        container = None
        signature = hashlib.sha256(json.dumps(signature).encode()).hexdigest()
    key = {"dataset": "omniglot", "part": part, "source": signature, "size": size,
           "resample": resample, "invert": True}

    def build():
        members = listing
        if members is None:
            with open_zip(source) as archive:
                try:
                    members = [i.filename for i in archive.infolist() if not i.is_dir()]
                except (zipfile.BadZipFile, OSError, ValueError) as error:
                    raise DataError(f"{source} is not a readable zip archive ({error})") from None
        ordered, names = _layout(members, str(source))
        decoded = decode_images(ordered, container, size, grayscale=True, invert=True,
                                resample=resample, workers=workers)
        drawings = len(ordered) // len(names)
        return decoded.reshape(len(names), drawings, *decoded.shape[1:]), {"characters": names}

    def fits(meta, array) -> bool:  # one character name per row of drawings
        names = meta.get("characters")
        return isinstance(names, list) and len(names) == len(array) \
            and all(isinstance(name, str) for name in names)

    array, meta = cached_array(f"omniglot-{part}-{'x'.join(map(str, size or (NATIVE_SIZE,) * 2))}",
                               key, build, cache, fits)
    return array, list(meta["characters"])
