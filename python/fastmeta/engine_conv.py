"""The compiled CPU engine for conv4-shaped models: MAML (second- and first-order),
Meta-SGD, ANIL and Reptile meta-steps for an ``nn.Sequential`` of blocks
``Conv2d(3x3, padding 1) -> BatchNorm2d -> ReLU -> MaxPool2d(2)`` followed by ``Flatten``
and a ``Linear`` head (``fastmeta.models.conv4``), all tasks of a meta-batch in one call into
``fastmeta._core.ConvEngine``. ANIL (``adapted`` marks exactly the head's parameters)
computes each task's body features once and adapts the head alone. ``backend="auto"``
picks it for such models on the CPU (see :func:`fastmeta.engines.compiled_engine`).

Batch norm always normalises with each task's batch statistics, as the reference engine
runs it (``fastmeta.functional``), whatever ``track_running_stats`` says.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastmeta import backends
from fastmeta.engine_cpu import CompiledEngine, _task_array, check_mse_targets
from fastmeta.functional import flatten_sequential, parameter_layout_reason

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


@dataclass(frozen=True)
class ConvSpec:
    """A conv4-shaped model as the engine sees it: one entry per block in ``channels``,
    ``conv_bias`` and ``eps``; the head maps ``features`` inputs to ``outputs``."""
    in_channels: int
    channels: tuple[int, ...]
    conv_bias: tuple[bool, ...]
    eps: tuple[float, ...]
    features: int
    outputs: int
    head_bias: bool

    @property
    def num_blocks(self) -> int:
        return len(self.channels)

    def parameter_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of ``model.parameters()`` in order, as the engine reads them."""
        shapes, previous = [], self.in_channels
        for channels, bias in zip(self.channels, self.conv_bias):
            shapes.append((channels, previous, 3, 3))
            shapes += [(channels,)] * (3 if bias else 2)
            previous = channels
        shapes.append((self.outputs, self.features))
        if self.head_bias:
            shapes.append((self.outputs,))
        return shapes

    def image_reason(self, height: int, width: int) -> str | None:
        """None when images of this size reach the head with ``features`` values."""
        h, w = height >> self.num_blocks, width >> self.num_blocks
        if h < 1 or w < 1 or self.channels[-1] * h * w != self.features:
            return (f"{height}x{width} images give {self.channels[-1] * max(h, 0) * max(w, 0)} "
                    f"features for a Linear head of {self.features}")
        return None


def _block_reason(conv, bn, relu, pool) -> str | None:
    """None when the four layers form one block the engine runs, else why not."""
    if type(conv) is not nn.Conv2d:
        return f"unsupported layer {type(conv).__name__} where a block's Conv2d should be"
    if conv.in_channels == 0 or conv.out_channels == 0:
        return f"a Conv2d with no channels ({conv.in_channels} -> {conv.out_channels})"
    if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
            conv.padding_mode) != ((3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros"):
        return "a Conv2d other than 3x3 with stride 1, padding 1, no dilation or groups"
    if type(bn) is not nn.BatchNorm2d:
        return f"{type(bn).__name__} after a Conv2d (the engine needs BatchNorm2d)"
    if bn.num_features != conv.out_channels or not bn.affine:
        return "a BatchNorm2d without affine weights or of another width than its Conv2d"
    if not bn.eps > 0 or bn.eps == float("inf"):
        return f"a BatchNorm2d with eps={bn.eps!r} (it must be a finite positive number)"
    if type(relu) is not nn.ReLU:
        return f"{type(relu).__name__} after a BatchNorm2d (the engine needs ReLU)"
    if type(pool) is not nn.MaxPool2d:
        return f"{type(pool).__name__} after a ReLU (the engine needs MaxPool2d(2))"
    pairs = [(v, v) if isinstance(v, int) else tuple(v)
             for v in (pool.kernel_size, pool.stride if pool.stride is not None else pool.kernel_size,
                       pool.padding, pool.dilation)]
    if pairs != [(2, 2), (2, 2), (0, 0), (1, 1)] or pool.ceil_mode or pool.return_indices:
        return "a MaxPool2d other than MaxPool2d(2)"
    return None


def conv_spec(model: nn.Module) -> ConvSpec | str:
    """The engine's spec of ``model``, or a reason string when the engine cannot run it."""
    layers = flatten_sequential(model)
    if layers is None:
        return f"{type(model).__name__} is not an nn.Sequential"
    layers = [layer for layer in layers if type(layer) is not nn.Identity]
    if len(layers) < 6 or (len(layers) - 2) % 4 != 0:
        return "not conv4-shaped: blocks of (Conv2d, BatchNorm2d, ReLU, MaxPool2d), Flatten, Linear"
    channels, conv_bias, eps = [], [], []
    previous = None
    for start in range(0, len(layers) - 2, 4):
        block = layers[start:start + 4]
        reason = _block_reason(*block)
        if reason:
            return reason
        conv, bn = block[0], block[1]
        if previous is not None and conv.in_channels != previous:
            return f"Conv2d layers of mismatched channels ({previous} -> {conv.in_channels})"
        previous = conv.out_channels
        channels.append(conv.out_channels)
        conv_bias.append(conv.bias is not None)
        eps.append(float(bn.eps))
    flatten, head = layers[-2], layers[-1]
    if type(flatten) is not nn.Flatten or (flatten.start_dim, flatten.end_dim) != (1, -1):
        return "the blocks must be followed by nn.Flatten() and a Linear head"
    if type(head) is not nn.Linear:
        return f"unsupported head {type(head).__name__} (the engine needs Linear)"
    spec = ConvSpec(layers[0].in_channels, tuple(channels), tuple(conv_bias), tuple(eps),
                    head.in_features, head.out_features, head.bias is not None)
    if [tuple(p.shape) for p in model.parameters()] != spec.parameter_shapes():
        return "the model's parameters are not exactly its layers' (tied or extra parameters)"
    return spec


class CompiledConv4(CompiledEngine):
    """The engine for one conv4-shaped model: its spec and one compiled engine per image
    size (each keeps its scratch memory between calls). Build once, call every step."""

    scans_inputs = False  # its inputs are checked in Python (a small cost beside its step)

    def __init__(self, model: nn.Module, loss: str, adapted: Sequence[bool] | None = None):
        self.model = model
        self.loss = loss
        spec = conv_spec(model)
        self.reason: str | None = spec if isinstance(spec, str) else None
        self.spec: ConvSpec | None = None if isinstance(spec, str) else spec
        self.head_only = False  # ANIL: only the Linear head adapts
        self._norms = [m for m in model.modules() if type(m) is nn.BatchNorm2d]
        self._engines: dict[tuple[int, int], object] = {}
        self._arrays_cache: dict[str, tuple[list[int], list]] = {}
        if self.spec is None:
            return
        # (batch norm's weight and bias have one shape: only their order tells them apart)
        layout = parameter_layout_reason(flatten_sequential(model),
                                         len(list(model.parameters())))
        if layout is not None:
            self.reason, self.spec = layout, None
            return
        self.shapes = self.spec.parameter_shapes()
        self.num_params = sum(int(np.prod(s)) for s in self.shapes)
        if adapted is not None and not all(adapted):
            head = 2 if self.spec.head_bias else 1
            if list(adapted) != [False] * (len(self.shapes) - head) + [True] * head:
                self.reason, self.spec = "the adapted parameters are not exactly the Linear head's", None
                return
            self.head_only = True

    def __getstate__(self):  # the compiled engines (and their scratch memory) are not copied
        return {**self.__dict__, "_engines": {}, "_arrays_cache": {}}

    def engine(self, height: int, width: int):
        key = (height, width)
        if key not in self._engines:
            s = self.spec
            self._engines[key] = backends.core().ConvEngine(
                s.in_channels, height, width, list(s.channels), list(s.conv_bias), list(s.eps),
                s.outputs, s.head_bias, self.loss, self.head_only)
        return self._engines[key]

    def input_reason(self, x: Tensor) -> str | None:
        """None when the engine takes inputs shaped like ``x`` ([T, N, C, H, W]), else why not."""
        if x.dtype not in _NUMPY:
            return f"the compiled engine runs float32 and float64, not {x.dtype}"
        if x.dim() != 5 or x.shape[2] != self.spec.in_channels:
            return (f"inputs of shape {tuple(x.shape)} (the conv engine takes "
                    f"[tasks, samples, {self.spec.in_channels}, height, width])")
        return self.spec.image_reason(x.shape[3], x.shape[4])

    def _engine_for(self, support_x: Tensor, query_x: Tensor | None):
        eps = tuple(float(bn.eps) for bn in self._norms)
        if eps != self.spec.eps:  # the engines hold the eps they were built with
            spec = conv_spec(self.model)
            if isinstance(spec, str):
                raise ValueError(f"the conv engine cannot run this model any more: {spec}")
            self.spec, self._engines = spec, {}
        for x in (support_x,) if query_x is None else (support_x, query_x):
            reason = self.input_reason(x)
            if reason:
                raise ValueError(f"the conv engine cannot run this batch: {reason}")
        if query_x is not None and query_x.shape[2:] != support_x.shape[2:]:
            raise ValueError(f"support images {tuple(support_x.shape[2:])} and query images "
                             f"{tuple(query_x.shape[2:])} differ in shape")
        return self.engine(support_x.shape[3], support_x.shape[4])

    def _inputs(self, x: Tensor, y: Tensor):
        check_mse_targets(self.loss, x, y, self.spec.outputs)
        return _task_array(x), _task_array(y)
