"""What the image data sets share: the class-dataset interface :class:`TaskSampler` reads,
decoding and resizing with Pillow (in a small process pool when there are many files), and
an on-disk cache of decoded pixels.

A class dataset holds its pixels once, as ``uint8`` (``value / 255``) or ``float32``, shaped
``[N, C, H, W]``, with an int64 class id in ``0..num_classes-1`` per image. ``images`` gives
the float32 view (converted once, on first use); the sampler gathers straight from the
stored pixels and converts only the images of each meta-batch.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fastmeta.checkpoint import atomic_write

#: bump when the decoded pixels of a cached data set would change
CACHE_FORMAT = 1

RESAMPLE = ("lanczos", "box", "bilinear", "bicubic", "nearest")

#: fewer images than this are decoded in this process (a pool costs more than it saves)
POOL_MIN_IMAGES = 2000


class DataError(ValueError):
    """A data set's files are missing, unreadable or not laid out as expected.

    The message names the path and what was expected there.
    """


# --------------------------------------------------------------------------------------------
# The class-dataset interface
# --------------------------------------------------------------------------------------------
class ClassDataset:
    """Images with a class id each: the interface :class:`fastmeta.data.TaskSampler` reads.

    ``pixels``: ``uint8`` (read as ``value / 255``) or floating ``[N, C, H, W]`` (numpy or
    torch); ``labels``: class ids ``[N]`` in ``0..num_classes-1``, every class present.
    ``groups``: optional ``[num_classes]`` ids of the source each class was made from
    (e.g. the four rotations of one Omniglot character share a group), which
    :func:`split_classes` keeps together. ``class_names``: optional names, one per class.

    Attributes: ``pixels`` (as stored), ``images`` (float32 ``[N, C, H, W]`` in [0, 1],
    converted on first use), ``labels`` (int64 ``[N]``), ``num_classes``, ``groups``
    (int64 ``[num_classes]``), ``class_names``; ``indices_of(c)`` and ``class_table()``
    give the images of each class.
    """

    def __init__(self, pixels, labels, num_classes: int | None = None, groups=None,
                 class_names: Sequence[str] | None = None):
        pixels = torch.as_tensor(pixels)
        labels = torch.as_tensor(labels)
        if pixels.dim() != 4:
            raise ValueError(f"pixels must have shape [N, C, H, W], got {tuple(pixels.shape)}")
        if pixels.dtype != torch.uint8 and not pixels.is_floating_point():
            raise TypeError(f"pixels must be uint8 or floating point, got {pixels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != pixels.shape[0]:
            raise ValueError(f"labels must have shape [{pixels.shape[0]}] (one per image), "
                             f"got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class ids, got {labels.dtype}")
        labels = labels.to(torch.int64)
        if pixels.shape[0] == 0:
            raise ValueError("a class dataset needs at least one image")
        if num_classes is None:
            num_classes = int(labels.max()) + 1
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"labels must lie in 0..{num_classes - 1}, got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        counts = torch.bincount(labels, minlength=num_classes)
        if bool((counts == 0).any()):
            missing = int((counts == 0).nonzero()[0, 0])
            raise ValueError(f"class {missing} has no images (labels must cover 0..{num_classes - 1})")
        if groups is None:
            groups = torch.arange(num_classes)
        groups = torch.as_tensor(groups, dtype=torch.int64)
        if tuple(groups.shape) != (num_classes,):
            raise ValueError(f"groups must have shape [{num_classes}], got {tuple(groups.shape)}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
        self.pixels = pixels.contiguous()
        self.labels = labels.contiguous()
        self.num_classes = int(num_classes)
        self.groups = groups
        self.class_names = list(class_names) if class_names is not None else None
        self._counts = counts
        self._images: Tensor | None = None
        self._table: tuple[Tensor, Tensor] | None = None

    # ----------------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The factor that maps stored pixels to [0, 1]: 1/255 for uint8, else 1."""
        return 1.0 / 255.0 if self.pixels.dtype == torch.uint8 else 1.0

    @property
    def images(self) -> Tensor:
        """float32 ``[N, C, H, W]`` in [0, 1] (converted once, then kept)."""
        if self._images is None:
            if self.pixels.dtype == torch.float32:
                self._images = self.pixels
            else:
                self._images = self.pixels.to(torch.float32).mul_(self.scale)
        return self._images

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape[1:])

    @property
    def class_sizes(self) -> Tensor:
        """Images per class, int64 ``[num_classes]``."""
        return self._counts

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.pixels[index].to(torch.float32) * self.scale
        return image, int(self.labels[index])

    def indices_of(self, cls: int) -> Tensor:
        """The indices of class ``cls``'s images, int64, ascending."""
        if isinstance(cls, bool) or not isinstance(cls, (int, np.integer)) or not 0 <= cls < self.num_classes:
            raise ValueError(f"cls must be a class id in 0..{self.num_classes - 1}, got {cls!r}")
        table, counts = self.class_table()
        return table[cls, : int(counts[cls])].clone()

    def class_table(self) -> tuple[Tensor, Tensor]:
        """``(table, counts)``: ``table[c, :counts[c]]`` are class ``c``'s image indices
        (ascending), the rest of the row is -1; int64 ``[num_classes, max count]`` and
        ``[num_classes]``. Computed once."""
        if self._table is None:
            order = torch.argsort(self.labels, stable=True)
            counts = self._counts
            width = int(counts.max())
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(len(order)) - starts[self.labels[order]]
            table = torch.full((self.num_classes, width), -1, dtype=torch.int64)
            table[self.labels[order], slot] = order
            self._table = (table, counts)
        return self._table

    def subset(self, classes: Sequence[int]) -> "ClassDataset":
        """A dataset of the given classes only, relabelled ``0..len(classes)-1`` in the given
        order (pixels are copied)."""
        classes = torch.as_tensor(list(classes), dtype=torch.int64)
        if classes.numel() == 0:
            raise ValueError("subset: classes is empty")
        if int(classes.min()) < 0 or int(classes.max()) >= self.num_classes:
            raise ValueError(f"subset: classes must lie in 0..{self.num_classes - 1}")
        if len(set(classes.tolist())) != classes.numel():
            raise ValueError("subset: classes has duplicates")
        remap = torch.full((self.num_classes,), -1, dtype=torch.int64)
        remap[classes] = torch.arange(classes.numel())
        keep = (remap[self.labels] >= 0).nonzero().flatten()
        names = None if self.class_names is None else [self.class_names[c] for c in classes.tolist()]
        return ClassDataset(self.pixels[keep], remap[self.labels[keep]], classes.numel(),
                            self.groups[classes], names)

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.image_shape)
        return (f"{type(self).__name__}({self.num_classes} classes, {len(self)} images of "
                f"{shape}, {str(self.pixels.dtype).replace('torch.', '')})")


def split_classes(dataset: ClassDataset, val, seed: int = 0) -> tuple[ClassDataset, ClassDataset]:
    """Splits ``dataset``'s classes into two disjoint class datasets ``(train, val)``.

    ``val`` is the number of groups (or, as a float in (0, 1), the fraction of groups) that
    go to the validation side; a group is the source a class was made from, so all
    rotations of one character (or digit) land on the same side and no image's rotated
    copy leaks across. The choice is seeded and reproducible.
    """
    if not isinstance(dataset, ClassDataset):
        raise TypeError(f"split_classes: dataset must be a ClassDataset, got {type(dataset).__name__}")
    groups = torch.unique(dataset.groups)
    count = len(groups)
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise TypeError(f"split_classes: val must be a number of groups or a fraction, got {val!r}")
    if isinstance(val, float):
        if not 0.0 < val < 1.0:
            raise ValueError(f"split_classes: a fractional val must lie in (0, 1), got {val}")
        val = max(1, round(val * count))
    if not 1 <= val < count:
        raise ValueError(f"split_classes: val must leave at least one group on each side; "
                         f"the dataset has {count} groups, got val={val}")
    generator = torch.Generator().manual_seed(seed)
    chosen = groups[torch.randperm(count, generator=generator)[:val]]
    is_val = torch.isin(dataset.groups, chosen)
    classes = torch.arange(dataset.num_classes)
    return dataset.subset(classes[~is_val].tolist()), dataset.subset(classes[is_val].tolist())


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------
def resample_filter(name: str):
    from PIL import Image

    if name not in RESAMPLE:
        raise ValueError(f"resample must be one of {RESAMPLE}, got {name!r}")
    return getattr(Image.Resampling, name.upper())


def check_size(image_size) -> tuple[int, int] | None:
    """``None``, an int, or ``(height, width)`` -> ``None`` or ``(height, width)``."""
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (int(image_size), int(image_size))
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
                   for s in image_size)):
        raise ValueError(f"image_size must be None, a positive integer or (height, width), "
                         f"got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


ORIENTATION_TAG = 0x0112  # EXIF's "Orientation"


def _as_displayed(image, where: str):
    """``image`` as a viewer shows it, in an 8-bit mode: EXIF orientation applied,
    transparency composited onto white, 16-bit grey scaled to 8 bits (``convert`` would clip
    it). 32-bit integer and float images have no agreed range: refused."""
    from PIL import Image, ImageOps

    if image.getexif().get(ORIENTATION_TAG, 1) != 1:  # (exif_transpose copies even when not)
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8))
    if image.mode in ("I", "F"):
        raise DataError(f"cannot decode the image {where}: its pixels are "
                        f"{'32-bit integers' if image.mode == 'I' else 'floats'} with no set "
                        f"range; save it as 8- or 16-bit")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image


def _decode(data, where: str, size, grayscale: bool, invert: bool, resample: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image = _as_displayed(image, where).convert("L" if grayscale else "RGB")
    except DataError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError, zlib.error, struct.error, TypeError) as error:
        reason = "not an image format PIL reads" if isinstance(error, UnidentifiedImageError) \
            else error
        raise DataError(f"cannot decode the image {where}: {reason}") from None
    if invert:
        image = Image.fromarray(255 - np.asarray(image))
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), resample_filter(resample))
    return np.asarray(image)


def _decode_chunk(job) -> np.ndarray:
    """Decodes one chunk of files: ``(container, names, size, grayscale, invert, resample)``,
    where ``container`` is a zip archive's path or None (then names are file paths)."""
    container, names, size, grayscale, invert, resample = job
    arrays = []
    if container is None:
        for name in names:
            try:
                with open(name, "rb") as handle:
                    data = handle.read()
            except OSError as error:
                raise DataError(f"cannot read the image {name}: {error}") from None
            arrays.append(_decode(data, str(name), size, grayscale, invert, resample))
    else:
        with open_zip(container) as archive:
            for name in names:
                where = f"{container}:{name}"
                try:
                    data = archive.read(name)
                except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError,
                        KeyError, ValueError, zlib.error) as error:
                    raise DataError(f"cannot read {where} (the archive is corrupt: {error})") from None
                arrays.append(_decode(data, where, size, grayscale, invert, resample))
    if not arrays:
        return np.zeros((0,), np.uint8)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        odd = next(i for i, a in enumerate(arrays) if a.shape != first)
        raise DataError(f"images differ in size: {names[0]} is {first[1]}x{first[0]} but "
                        f"{names[odd]} is {arrays[odd].shape[1]}x{arrays[odd].shape[0]}; "
                        f"pass image_size= to resize them all")
    return np.stack(arrays)


def open_zip(path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DataError(f"no such file {path}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as error:
        raise DataError(f"{path} is not a readable zip archive ({error})") from None


def default_workers() -> int:
    """Processes for decoding: one per CPU this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def decode_images(names: Sequence[str], container=None, size=None, grayscale: bool = True,
                  invert: bool = False, resample: str = "lanczos",
                  workers: int | None = None) -> np.ndarray:
    """Decodes (and resizes to ``size = (height, width)``) images: file paths, or members of
    the zip archive ``container``. Returns uint8 ``[N, H, W]`` (grayscale) or ``[N, H, W, 3]``.

    Many files are split over a pool of ``workers`` forked processes (default: the usable
    CPUs); any unreadable file raises :class:`DataError` naming it.
    """
    resample_filter(resample)  # validate early
    names = [str(n) for n in names]
    container = None if container is None else str(container)
    workers = default_workers() if workers is None else max(1, int(workers))
    if workers > 1 and len(names) >= POOL_MIN_IMAGES:
        import multiprocessing

        if "fork" not in multiprocessing.get_all_start_methods():
            workers = 1
    else:
        workers = 1
    if workers == 1:
        parts = [_decode_chunk((container, names, size, grayscale, invert, resample))]
    else:
        from concurrent.futures import ProcessPoolExecutor
        import multiprocessing

        pieces = workers * 4
        step = -(-len(names) // pieces)
        jobs = [(container, names[i:i + step], size, grayscale, invert, resample)
                for i in range(0, len(names), step)]
        # The workers use only Pillow and numpy, so forking is safe and starts in
        # milliseconds (a spawned worker would re-import torch first).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                parts = list(pool.map(_decode_chunk, jobs))
    parts = [p for p in parts if p.size]
    if not parts:
        return np.zeros((0,), np.uint8)
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise DataError(f"images differ in size ({sorted(shapes)}); pass image_size= to resize them all")
    return np.concatenate(parts)


def natural_key(text: str):
    """Sort key that orders embedded numbers numerically ("character2" < "character10")."""
    # (isdecimal: "²" is a digit, but int() refuses it; every \d character is decimal)
    return [int(t) if t.isdecimal() else t for t in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$FASTMETA_CACHE``, else ``$XDG_CACHE_HOME/fastmeta``, else ``~/.cache/fastmeta``."""
    if os.environ.get("FASTMETA_CACHE"):
        return Path(os.environ["FASTMETA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastmeta"


def file_signature(path) -> list:
    """What identifies a source file's version for the cache: name, size, mtime."""
    stat = os.stat(path)
    return [os.path.basename(str(path)), stat.st_size, stat.st_mtime_ns]


def cached_array(prefix: str, key: dict, build: Callable[[], tuple[np.ndarray, dict]],
                 use_cache: bool = True,
                 meta_fits: Callable[[dict, np.ndarray], bool] = lambda meta, array: True
                 ) -> tuple[np.ndarray, dict]:
    """``build()`` -> ``(array, meta)``, stored as ``<cache>/<prefix>-<hash of key>.npy`` with
    a ``.json`` beside it; later calls with the same key read it back instead. A cache that
    cannot be written only warns; a damaged one (``meta_fits`` says whether a stored meta
    goes with its array) is rebuilt."""
    if not use_cache:
        return build()
    text = json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    directory = cache_dir()
    array_path = directory / f"{prefix}-{digest}.npy"
    meta_path = directory / f"{prefix}-{digest}.json"
    if array_path.exists() and meta_path.exists():
        try:
            with open(meta_path) as handle:
                stored = json.load(handle)
            if isinstance(stored, dict) and stored.get("key") == text:
                array = np.load(array_path, allow_pickle=False)
                if (list(array.shape) == stored["shape"] and str(array.dtype) == stored["dtype"]
                        and isinstance(stored["meta"], dict) and meta_fits(stored["meta"], array)):
                    return array, stored["meta"]
        except (OSError, ValueError, KeyError, TypeError, EOFError):
            pass  # damaged: rebuild below
    array, meta = build()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(array_path, lambda h: np.save(h, array, allow_pickle=False))
        record = {"key": text, "shape": list(array.shape), "dtype": str(array.dtype), "meta": meta}
        atomic_write(meta_path, lambda h: h.write(json.dumps(record).encode()))
    except OSError as error:
        warnings.warn(f"fastmeta: could not cache decoded images in {directory} ({error}); "
                      f"set FASTMETA_CACHE to a writable folder to make the next load fast",
                      RuntimeWarning, stacklevel=3)
    return array, meta
