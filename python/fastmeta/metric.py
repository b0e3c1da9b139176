"""Metric-based few-shot learners: Prototypical Networks and Relation Networks.

Both take meta-batches in the same layout as ``fastmeta.MAML``: ``support_x [T, S, *in]``,
``support_y [T, S]`` (int64 labels ``0..N-1``, every class present in each task's support
set), ``query_x [T, Q, *in]``, ``query_y [T, Q]``. ``learner(sx, sy, qx, qy)`` returns the
mean over tasks of the query loss (its backward trains the encoder), and
``learner.predict(sx, sy, qx)`` the query scores ``[T, Q, N]`` (arg-max = predicted label).
The encoder sees all tasks' support and query images in one batch (``[T*(S+Q), *in]``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.checks import check_inputs, check_targets, reference_parameter
from fastmeta.losses import check_finite, per_task_accuracy

DISTANCES = ("sqeuclidean", "cosine")


def _check_episode(learner: str, encoder: nn.Module, support_x, support_y, query_x,
                   query_y=None, needs_query_y: bool = False) -> int:
    """Validates an episode batch; returns the number of ways N."""
    if needs_query_y and query_y is None:
        raise ValueError(f"{learner}: query_y is required (the loss is measured on the queries)")
    like = reference_parameter(encoder)
    check_inputs("support_x", support_x, like, None)
    check_targets("support_y", support_y, support_x, "cross_entropy", None)
    check_inputs("query_x", query_x, like, support_x.shape[0])
    if tuple(query_x.shape[2:]) != tuple(support_x.shape[2:]):
        raise ValueError(f"query_x samples have shape {tuple(query_x.shape[2:])} but support_x "
                         f"samples have {tuple(support_x.shape[2:])}")
    ways = int(support_y.max()) + 1
    if ways > support_y.shape[1]:  # (a label past S cannot leave every label present)
        raise ValueError(f"{learner}: support_y holds label {ways - 1} but a task has only "
                         f"{support_y.shape[1]} support samples: labels must be 0..N-1")
    present = F.one_hot(support_y, ways).sum(1) > 0                    # [T, N]
    if not bool(present.all()):
        task, label = (~present).nonzero()[0].tolist()
        raise ValueError(f"{learner}: support_y must hold every label 0..{ways - 1} in each task "
                         f"(labels 0..N-1, N inferred as max + 1); task {task} has no label {label}")
    if query_y is not None:
        check_targets("query_y", query_y, query_x, "cross_entropy", ways)
    return ways


def _embed(encoder: nn.Module, support_x: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
    """Runs the encoder once on all images of all tasks; returns ``[T, S, ...]``, ``[T, Q, ...]``."""
    tasks, shots, queries = support_x.shape[0], support_x.shape[1], query_x.shape[1]
    inputs = torch.cat([support_x.reshape(tasks * shots, *support_x.shape[2:]),
                        query_x.reshape(tasks * queries, *query_x.shape[2:])])
    features = encoder(inputs)
    if not isinstance(features, Tensor) or features.dim() < 2 or features.shape[0] != inputs.shape[0] \
            or features[0].numel() == 0:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"the encoder must map [B, *in] to [B, ...] features (at least one "
                         f"per sample), got {shape} for B = {inputs.shape[0]}")
    support = features[: tasks * shots].reshape(tasks, shots, *features.shape[1:])
    query = features[tasks * shots:].reshape(tasks, queries, *features.shape[1:])
    return support, query


def class_means(features: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Per-task class means: ``features [T, S, D]``, ``labels [T, S]`` -> ``[T, N, D]``."""
    onehot = F.one_hot(labels, ways).to(features.dtype)                  # [T, S, N]
    sums = torch.bmm(onehot.transpose(1, 2), features)                   # [T, N, D]
    return sums / onehot.sum(1).unsqueeze(-1)


def accuracy(scores: Tensor, targets: Tensor, per_task: bool = False) -> Tensor:
    """Fraction of arg-max predictions equal to ``targets``: ``scores [T, Q, N]`` and
    ``targets [T, Q]`` -> a scalar (mean over tasks) or ``[T]`` with ``per_task=True``."""
    if scores.dim() != 3 or tuple(targets.shape) != tuple(scores.shape[:2]):
        raise ValueError(f"accuracy: scores must be [T, Q, N] and targets [T, Q], got "
                         f"{tuple(scores.shape)} and {tuple(targets.shape)}")
    per = per_task_accuracy(scores.detach().float(), targets)
    return per if per_task else per.mean()


class ProtoNet(nn.Module):
    """Prototypical Networks (Snell, Swersky & Zemel 2017).

    ``encoder`` maps ``[B, *in]`` to features ``[B, ...]`` (flattened to ``[B, D]``). Each
    class's prototype is the mean of its support features; a query's scores are
    ``-||f(x) - c_n||^2`` (``distance="sqeuclidean"``, as in the paper) or
    ``scale * cos(f(x), c_n)`` (``distance="cosine"``; ``scale`` (default 10) sharpens the
    softmax, and is learned when ``learn_scale``). The loss is the query cross-entropy,
    averaged per task, then over tasks.
    """

    def __init__(self, encoder: nn.Module, distance: str = "sqeuclidean", scale: float | None = None,
                 learn_scale: bool = False):
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if scale is None:
            scale = 10.0 if distance == "cosine" else 1.0
        if (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0
                or not math.isfinite(scale)):
            raise ValueError(f"scale must be a finite positive number, got {scale!r}")
        self.encoder = encoder
        self.distance = distance
        self._scaled = bool(learn_scale) or float(scale) != 1.0
        like = reference_parameter(encoder)
        value = torch.tensor(float(scale), dtype=like.dtype, device=like.device)
        if not bool(torch.isfinite(value)):
            raise ValueError(f"scale {scale!r} overflows the encoder's {like.dtype}")
        if learn_scale:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

    def _scores(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        support, query = support.flatten(2), query.flatten(2)
        prototypes = class_means(support, support_y, ways)                # [T, N, D]
        if self.distance == "cosine":
            return self.scale * torch.bmm(F.normalize(query, dim=-1),
                                          F.normalize(prototypes, dim=-1).transpose(1, 2))
        # ||q - c||^2 = ||q||^2 - 2 q.c + ||c||^2, without the [T, Q, N, D] difference tensor
        squared = ((query * query).sum(-1, keepdim=True)
                   - 2 * torch.bmm(query, prototypes.transpose(1, 2))
                   + (prototypes * prototypes).sum(-1).unsqueeze(1))
        scores = -squared.clamp_min(0)
        return self.scale * scores if self._scaled else scores

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Query scores ``[T, Q, N]`` (negative squared distances, or scaled cosines)."""
        ways = _check_episode("ProtoNet", self.encoder, support_x, support_y, query_x)
        support, query = _embed(self.encoder, support_x, query_x)
        return self._scores(support, support_y, query, ways)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                query_y: Tensor) -> Tensor:
        ways = _check_episode("ProtoNet", self.encoder, support_x, support_y, query_x, query_y,
                              needs_query_y=True)
        support, query = _embed(self.encoder, support_x, query_x)
        scores = self._scores(support, support_y, query, ways)
        tasks, queries = query_y.shape
        losses = F.cross_entropy(scores.reshape(tasks * queries, ways), query_y.reshape(-1),
                                 reduction="none").reshape(tasks, queries).mean(1)
        check_finite(losses, "the query loss")
        return losses.mean()


class RelationNet(nn.Module):
    """Relation Networks (Sung et al. 2018).

    ``encoder`` maps images ``[B, *in]`` to feature maps ``[B, C, h, w]``; each class's
    feature is the sum of its support features (as in the paper's K-shot setting); every
    (class, query) pair, concatenated along channels as ``[class, query]`` (``[B, 2C, h, w]``),
    goes through ``relation_module``, which gives a relation score in [0, 1] per pair
    (``[B, 1]`` or ``[B]``). The loss is the mean squared error against the one-hot labels,
    averaged per task, then over tasks, as in the paper. ``predict`` returns the scores
    ``[T, Q, N]``.

    :func:`relation_encoder` and :func:`relation_module` build the paper's networks;
    ``RelationNet.build(in_channels, image_size)`` makes both.
    """

    def __init__(self, encoder: nn.Module, relation_module: nn.Module):
        super().__init__()
        for name, module in (("encoder", encoder), ("relation_module", relation_module)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(module).__name__}")
        self.encoder = encoder
        self.relation_module = relation_module

    @classmethod
    def build(cls, in_channels: int = 1, image_size: int = 28, hidden: int = 64,
              relation_hidden: int = 8, padding: int | None = None) -> "RelationNet":
        """The paper's Omniglot/miniImageNet networks for ``image_size`` inputs.

        ``padding`` of the encoder's first two convolutions: 0 as in the paper; the default
        (None) uses 1 for images smaller than 28 so that small images (8x8 digits) still
        leave a feature map."""
        if padding is None:
            padding = 0 if image_size >= 28 else 1
        encoder = relation_encoder(in_channels, hidden, padding)
        size = relation_feature_size(image_size, padding)
        return cls(encoder, relation_module(hidden, size, relation_hidden))

    def _scores(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        if support.dim() != 5:
            raise ValueError(f"RelationNet: the encoder must give feature maps [B, C, h, w], got "
                             f"[B, {', '.join(str(s) for s in support.shape[2:])}]")
        tasks, queries = query.shape[:2]
        maps = support.shape[2:]                                          # C, h, w
        onehot = F.one_hot(support_y, ways).to(support.dtype)             # [T, S, N]
        classes = torch.bmm(onehot.transpose(1, 2), support.flatten(2))   # sums, [T, N, C*h*w]
        classes = classes.reshape(tasks, 1, ways, *maps).expand(tasks, queries, ways, *maps)
        query = query.unsqueeze(2).expand(tasks, queries, ways, *maps)
        pairs = torch.cat([classes, query], dim=3).reshape(tasks * queries * ways, 2 * maps[0],
                                                           *maps[1:])
        scores = self.relation_module(pairs)
        if scores.numel() != tasks * queries * ways:
            raise ValueError(f"RelationNet: the relation module must give one score per pair, got "
                             f"{tuple(scores.shape)} for {tasks * queries * ways} pairs")
        return scores.reshape(tasks, queries, ways)

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Relation scores ``[T, Q, N]``."""
        ways = _check_episode("RelationNet", self.encoder, support_x, support_y, query_x)
        support, query = _embed(self.encoder, support_x, query_x)
        return self._scores(support, support_y, query, ways)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                query_y: Tensor) -> Tensor:
        ways = _check_episode("RelationNet", self.encoder, support_x, support_y, query_x, query_y,
                              needs_query_y=True)
        support, query = _embed(self.encoder, support_x, query_x)
        scores = self._scores(support, support_y, query, ways)
        target = F.one_hot(query_y, ways).to(scores.dtype)
        losses = ((scores - target) ** 2).flatten(1).mean(1)
        check_finite(losses, "the query loss")
        return losses.mean()


def _block(in_channels: int, out_channels: int, padding: int, pool: bool) -> list[nn.Module]:
    layers = [nn.Conv2d(in_channels, out_channels, 3, padding=padding),
              nn.BatchNorm2d(out_channels), nn.ReLU()]
    return layers + [nn.MaxPool2d(2)] if pool else layers


def relation_encoder(in_channels: int = 1, hidden: int = 64, padding: int = 0) -> nn.Sequential:
    """Sung et al.'s embedding: 4 x (conv3x3, BatchNorm2d, ReLU), the first two followed by
    2x2 max pooling (their convolutions with ``padding``, 0 in the paper), the last two with
    padding 1 and no pooling. 28x28 -> ``[hidden, 5, 5]``, 84x84 -> ``[hidden, 19, 19]``."""
    _check_positive(in_channels=in_channels, hidden=hidden)
    if padding not in (0, 1):
        raise ValueError(f"relation_encoder: padding must be 0 or 1, got {padding!r}")
    return nn.Sequential(*_block(in_channels, hidden, padding, True),
                         *_block(hidden, hidden, padding, True),
                         *_block(hidden, hidden, 1, False),
                         *_block(hidden, hidden, 1, False))


def relation_feature_size(image_size: int, padding: int = 0) -> int:
    """The side of :func:`relation_encoder`'s feature maps for ``image_size`` inputs."""
    size = image_size
    for _ in range(2):
        size = (size + 2 * padding - 2) // 2
    if size < 1:
        raise ValueError(f"image_size {image_size} is too small for the relation encoder "
                         f"with padding {padding}")
    return size


def relation_module(channels: int = 64, feature_size: int = 5, hidden: int = 8) -> nn.Sequential:
    """Sung et al.'s relation module for ``[2*channels, feature_size, feature_size]`` pairs:
    2 x (conv3x3 padding 1, BatchNorm2d, ReLU, 2x2 max pooling -- skipped once the map is
    1x1), then Linear(-> ``hidden``), ReLU, Linear(-> 1), Sigmoid."""
    _check_positive(channels=channels, feature_size=feature_size, hidden=hidden)
    layers, size = [], feature_size
    for i in range(2):
        layers += _block(2 * channels if i == 0 else channels, channels, 1, size >= 2)
        size = size // 2 if size >= 2 else size
    layers += [nn.Flatten(), nn.Linear(channels * size * size, hidden), nn.ReLU(),
               nn.Linear(hidden, 1), nn.Sigmoid()]
    return nn.Sequential(*layers)


def _check_positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
