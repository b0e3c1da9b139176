"""N-way K-shot episodes from any class dataset, a whole meta-batch at a time."""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

STATE_FORMAT = "fastmeta-task-sampler"


class FewShotTasks(NamedTuple):
    support_x: Tensor   # [T, N*K, C, H, W]
    support_y: Tensor   # [T, N*K] int64 in 0..N-1
    query_x: Tensor     # [T, N*Q, C, H, W]
    query_y: Tensor     # [T, N*Q] int64 in 0..N-1


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"TaskSampler: {name} must be a positive integer, got {value!r}")
    return int(value)


class TaskSampler:
    """Draws meta-batches of N-way K-shot classification tasks from a class dataset.

    ``dataset``: anything with ``labels`` (int ``[N]``), ``num_classes`` and either
    ``pixels`` (uint8 ``[N, C, H, W]`` read as ``value / 255``, or float) or ``images``
    (float ``[N, C, H, W]``) -- e.g. :class:`Digits`, :class:`Omniglot`,
    :class:`ImageFolderTasks` or any :class:`ClassDataset`.

    ``sample()`` (or iterating, endlessly) gives :class:`FewShotTasks`
    ``(support_x [T, N*K, C, H, W], support_y [T, N*K], query_x [T, N*Q, C, H, W],
    query_y [T, N*Q])``, ready for ``fastmeta.MAML``/``ProtoNet``/...:

    * each task's ``n_way`` classes are drawn without replacement, uniformly, and given
      labels ``0..n_way-1`` in random order (a fresh permutation per task);
    * each class's ``k_shot + q_queries`` images are drawn without replacement, so no query
      image is also in the support set;
    * samples are ordered by label (``support_y[t] = [0]*K + [1]*K + ...``, likewise
      ``query_y``); images are ``dtype`` (float32) in [0, 1], on ``device``.

    The stream is seeded by ``seed`` (its own ``torch.Generator`` on the CPU, so the tasks
    are the same on every device); ``state()``/``load_state()`` save and restore it for
    checkpoint resume. After each draw, ``last_classes`` (``[T, N]`` dataset class ids, in
    label order) and ``last_indices`` (dataset image indices ``(support [T, N*K],
    query [T, N*Q])``) say what was drawn.

    Everything is vectorised: classes come from random keys (or, when few are needed from
    many, from rejection-sampled distinct draws), images from random keys over a per-class
    index table, and the pixels from one gather per set.
    """

    def __init__(self, dataset, n_way: int, k_shot: int, q_queries: int, meta_batch: int,
                 seed: int = 0, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        self.n_way = _positive_int("n_way", n_way)
        self.k_shot = _positive_int("k_shot", k_shot)
        self.q_queries = _positive_int("q_queries", q_queries)
        self.meta_batch = _positive_int("meta_batch", meta_batch)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"TaskSampler: seed must be an integer, got {seed!r}")
        if not -2**63 <= seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ValueError(f"TaskSampler: seed must lie in [-2**63, 2**64), got {seed}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"TaskSampler: dtype must be a floating-point torch.dtype, got {dtype!r}")
        for attribute in ("labels", "num_classes"):
            if not hasattr(dataset, attribute):
                raise TypeError(f"TaskSampler: dataset must have .labels and .num_classes "
                                f"(a class dataset), {type(dataset).__name__} has no .{attribute}")
        self.dataset = dataset
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.seed = int(seed)

        table, counts = _class_table(dataset)
        self.num_classes = int(dataset.num_classes)
        if self.n_way > self.num_classes:
            raise ValueError(f"TaskSampler: n_way={self.n_way} is more than the dataset's "
                             f"{self.num_classes} classes")
        need = self.k_shot + self.q_queries
        smallest = int(torch.argmin(counts))
        if int(counts[smallest]) < need:
            names = getattr(dataset, "class_names", None)
            name = f" ({names[smallest]})" if names else ""
            raise ValueError(f"TaskSampler: k_shot + q_queries = {need} images per class, but "
                             f"class {smallest}{name} has only {_images(int(counts[smallest]))} "
                             f"(the smallest class)")
        self._table = table                                  # [C, M] int64, -1 padded
        self._counts = counts
        self._uniform = bool((counts == table.shape[1]).all())

        pixels = getattr(dataset, "pixels", None)
        if pixels is None:
            pixels = dataset.images
        pixels = torch.as_tensor(pixels)
        if pixels.dim() < 2 or pixels.shape[0] != int(counts.sum()):
            raise ValueError(f"TaskSampler: the dataset's images {tuple(pixels.shape)} do not match "
                             f"its {int(counts.sum())} labels")
        self._scale = 1.0 / 255.0 if pixels.dtype == torch.uint8 else 1.0
        if self.device is not None:
            pixels = pixels.to(self.device)
        self._pixels = pixels.contiguous()
        self.generator = torch.Generator().manual_seed(self.seed)
        self.last_classes: Tensor | None = None
        self.last_indices: tuple[Tensor, Tensor] | None = None
        self._labels_cache: dict = {}

    # ----------------------------------------------------------------------------------------
    def _choose_classes(self, tasks: int, n: int) -> Tensor:
        """``[tasks, n]`` distinct class ids per row, uniformly, in uniformly random order."""
        classes = self.num_classes
        if n * (n - 1) < classes:
            # Few from many: draw n ids per task and redraw the rows with a repeat (an exact
            # rejection sampler; a row is accepted with probability > 1/2).
            chosen = torch.randint(0, classes, (tasks, n), generator=self.generator)
            while True:
                ordered = chosen.sort(1).values
                bad = (ordered[:, 1:] == ordered[:, :-1]).any(1).nonzero().flatten()
                if bad.numel() == 0:
                    return chosen
                chosen[bad] = torch.randint(0, classes, (bad.numel(), n), generator=self.generator)
        keys = torch.rand(tasks, classes, generator=self.generator)
        return keys.topk(n, dim=1).indices

    def _choose_images(self, classes: Tensor, count: int) -> Tensor:
        """``[T, N, count]`` distinct image indices of each chosen class."""
        width = self._table.shape[1]
        keys = torch.rand(*classes.shape, width, generator=self.generator)
        if not self._uniform:   # padded slots never win: real slots have keys in [0, 1)
            keys.masked_fill_(self._table[classes] < 0, -1.0)
        if count == width:
            slots = keys.argsort(dim=2)
        else:
            slots = keys.topk(count, dim=2).indices
        return torch.gather(self._table[classes], 2, slots)

    def _labels(self, tasks: int, n: int, per_class: int) -> Tensor:
        key = (tasks, n, per_class)
        if key not in self._labels_cache:
            labels = torch.arange(n).repeat_interleave(per_class).expand(tasks, -1).contiguous()
            self._labels_cache[key] = labels.to(self._pixels.device)
        return self._labels_cache[key].clone()

    def _gather(self, indices: Tensor) -> Tensor:
        tasks, samples = indices.shape
        flat = indices.reshape(-1).to(self._pixels.device, non_blocking=True)
        picked = self._pixels.index_select(0, flat)
        picked = picked.to(self.dtype)
        if self._scale != 1.0:
            picked.mul_(self._scale)
        return picked.view(tasks, samples, *self._pixels.shape[1:])

    def sample(self, meta_batch: int | None = None) -> FewShotTasks:
        """One meta-batch of ``meta_batch`` (default: the sampler's) tasks."""
        tasks = self.meta_batch if meta_batch is None else _positive_int("meta_batch", meta_batch)
        n, k, q = self.n_way, self.k_shot, self.q_queries
        classes = self._choose_classes(tasks, n)                  # [T, N]
        images = self._choose_images(classes, k + q)              # [T, N, K+Q]
        support = images[:, :, :k].reshape(tasks, n * k)
        query = images[:, :, k:].reshape(tasks, n * q)
        self.last_classes, self.last_indices = classes, (support, query)
        return FewShotTasks(self._gather(support), self._labels(tasks, n, k),
                            self._gather(query), self._labels(tasks, n, q))

    def __iter__(self) -> Iterator[FewShotTasks]:
        while True:
            yield self.sample()

    # ----------------------------------------------------------------------------------------
    def _config(self) -> dict:
        return {"n_way": self.n_way, "k_shot": self.k_shot, "q_queries": self.q_queries,
                "num_classes": self.num_classes, "num_images": int(self._counts.sum())}

    def state(self) -> dict:
        """The position in the task stream (a dict of tensors and ints, checkpoint-safe)."""
        return {"format": STATE_FORMAT, "rng": self.generator.get_state(), **self._config()}

    def load_state(self, state: dict) -> None:
        """Continues the stream from ``state`` (from :meth:`state`) exactly."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "rng" not in state:
            raise ValueError("TaskSampler.load_state: state is not a TaskSampler state (from .state())")
        theirs = {k: state.get(k) for k in self._config()}
        if any(type(v) is not int for v in theirs.values()) or theirs != self._config():
            diff = ", ".join(f"{k}={theirs[k]!r} (here {v!r})" for k, v in self._config().items()
                             if type(theirs[k]) is not int or theirs[k] != v)
            raise ValueError(f"TaskSampler.load_state: the state is from a different sampler or "
                             f"dataset: {diff}")
        rng, own = state["rng"], self.generator.get_state()
        if not (isinstance(rng, Tensor) and rng.dtype == own.dtype and rng.shape == own.shape
                and rng.device == own.device):
            raise ValueError("TaskSampler.load_state: state['rng'] is not a CPU generator state "
                             f"(a uint8 tensor of {own.numel()} bytes, from .state())")
        self.generator.set_state(rng)

    def __repr__(self) -> str:
        return (f"TaskSampler({self.n_way}-way {self.k_shot}-shot, {self.q_queries} queries, "
                f"meta_batch={self.meta_batch}, {self.num_classes} classes, seed={self.seed})")


def _images(count: int) -> str:
    return f"{count} image" + ("" if count == 1 else "s")


def _class_table(dataset) -> tuple[Tensor, Tensor]:
    if hasattr(dataset, "class_table"):
        table, counts = dataset.class_table()
        return torch.as_tensor(table, dtype=torch.int64), torch.as_tensor(counts, dtype=torch.int64)
    labels = torch.as_tensor(dataset.labels).to(torch.int64).cpu()
    num_classes = int(dataset.num_classes)
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"TaskSampler: dataset.labels must be a non-empty [N] tensor, got {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"TaskSampler: dataset.labels must lie in 0..{num_classes - 1}")
    counts = torch.bincount(labels, minlength=num_classes)
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(order)) - starts[labels[order]]
    table = torch.full((num_classes, max(1, int(counts.max()))), -1, dtype=torch.int64)
    table[labels[order], slot] = order
    return table, counts
