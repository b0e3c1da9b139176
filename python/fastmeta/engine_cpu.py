"""The compiled CPU engine for MLPs: MAML (second- and first-order), Meta-SGD, ANIL and
Reptile meta-steps for an ``nn.Sequential`` of ``Linear`` layers and element-wise
activations, all tasks of a meta-batch in one call into ``fastmeta._core``.

The engine computes the meta-gradient itself (no autograd graph);
:func:`fastmeta.precomputed.with_gradient` hands it back to autograd, so ``loss.backward()``
fills ``.grad`` exactly as with the reference engine. Inputs are validated by
:mod:`fastmeta.checks` before they get here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastmeta import backends
from fastmeta.checks import check_batch_values, check_same_parameters
from fastmeta.functional import flatten_sequential
from fastmeta.losses import check_finite

_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}
_DTYPES = tuple(_NUMPY)


@dataclass(frozen=True)
class MlpSpec:
    """An MLP as the engine sees it: Linear layers ``widths[i] -> widths[i + 1]``, each
    followed by ``activations[i]`` ("identity" when none)."""
    widths: tuple[int, ...]
    activations: tuple[str, ...]
    has_bias: tuple[bool, ...]
    flattens_input: bool  # the model starts with nn.Flatten: inputs [T, N, *in] are flattened

    @property
    def num_layers(self) -> int:
        return len(self.activations)


def mlp_spec(model: nn.Module) -> MlpSpec | str:
    """The engine's spec of ``model``, or a reason string when the engine cannot run it.

    Accepted: a (possibly nested) ``nn.Sequential`` of ``nn.Linear``, ``nn.ReLU``,
    ``nn.Tanh``, ``nn.Sigmoid`` and ``nn.Identity``, with at most one activation after each
    Linear layer and an optional leading ``nn.Flatten()``.
    """
    layers = flatten_sequential(model)
    if layers is None:
        return f"{type(model).__name__} is not an nn.Sequential"
    layers = [layer for layer in layers if type(layer) is not nn.Identity]
    flattens = False
    while layers and type(layers[0]) is nn.Flatten:
        if (layers[0].start_dim, layers[0].end_dim) != (1, -1):
            return "nn.Flatten with start_dim != 1 or end_dim != -1"
        flattens = True
        layers = layers[1:]
    widths, activations, has_bias = [], [], []
    for layer in layers:
        kind = type(layer)
        if kind is nn.Linear:
            if layer.in_features == 0 or layer.out_features == 0:
                return f"a Linear layer of zero width ({layer.in_features} -> {layer.out_features})"
            if widths and widths[-1] != layer.in_features:
                return f"Linear layers of mismatched widths ({widths[-1]} -> {layer.in_features})"
            if not widths:
                widths.append(layer.in_features)
            widths.append(layer.out_features)
            activations.append("identity")
            has_bias.append(layer.bias is not None)
        elif kind in _ACTIVATIONS:
            if not activations:
                return f"an activation ({kind.__name__}) before the first Linear layer"
            if activations[-1] != "identity":
                return f"two activations in a row ({activations[-1]}, {kind.__name__})"
            activations[-1] = _ACTIVATIONS[kind]
        else:
            return f"unsupported layer {kind.__name__}"
    if not activations:
        return "the model has no Linear layer"
    return MlpSpec(tuple(widths), tuple(activations), tuple(has_bias), flattens)


@dataclass
class EngineResult:
    """What one engine call returns (per-task values are ``[T]``, detached)."""
    query_losses: Tensor | None      # [T] (None for Reptile)
    query_accuracies: Tensor | None  # [T] (cross-entropy only)
    support_losses: Tensor           # [T, K]: mean support loss before each inner step
    grads: list[Tensor] | None       # dL/dtheta per parameter (mean over tasks); Reptile: theta - mean phi_K
    lr_grads: list[Tensor] | None    # Meta-SGD: dL/d(inner rates) per parameter
    adapted: Tensor | None           # [T, P]: phi_K of every task, flat, when asked for
    all_finite: bool = True          # every support and query loss is finite

    def check_finite(self) -> None:
        """Raises FloatingPointError naming the first non-finite loss, in the order the
        reference engine checks them (each inner step's support losses, then the query)."""
        if not self.all_finite:
            check_finite_steps(self.support_losses, "the support loss")
            if self.query_losses is not None:
                check_finite(self.query_losses, "the query loss")


class CompiledEngine:
    """What the compiled engines' Python sides share: one meta-step over a meta-batch (numpy
    views in, numpy outputs handed to torch without copies) and cached parameter views.
    Subclasses give the model's spec (``reason`` says why there is none), ``shapes`` of its
    parameters, ``num_params``, and ``_engine_for`` / ``_inputs`` for a batch."""

    #: whether the engine itself scans the inputs for NaN before it computes anything
    scans_inputs = True
    loss: str
    reason: str | None
    shapes: list[tuple[int, ...]]
    num_params: int

    def _engine_for(self, support_x: Tensor, query_x: Tensor | None):
        raise NotImplementedError

    def _inputs(self, x: Tensor, y: Tensor):
        raise NotImplementedError

    def run(self, params: Sequence[Tensor], lrs: float | Sequence[Tensor], steps: int,
            algorithm: str, support_x: Tensor, support_y: Tensor, query_x: Tensor | None = None,
            query_y: Tensor | None = None, need_grad: bool = True,
            want_adapted: bool = False) -> EngineResult:
        """One meta-step. ``algorithm``: "second_order", "first_order" or "reptile";
        ``lrs``: the inner learning rate, or one rate tensor per parameter (Meta-SGD)."""
        query = algorithm != "reptile"
        if not query:
            query_x = query_y = None
        engine = self._engine_for(support_x, query_x)
        if not self.scans_inputs:
            check_batch_values(self.loss, support_x, support_y, query_x, query_y)
        dtype = _NUMPY[support_x.dtype]
        num_tasks = support_x.shape[0]
        meta_sgd = not isinstance(lrs, (int, float))   # (MetaSGD checked their dtype)
        lr_arg = self._arrays("lrs", lrs) if meta_sgd else float(lrs)
        # Outputs are numpy arrays, handed to torch without a copy: cheaper than torch.empty.
        support_losses = np.empty((num_tasks, steps), dtype)
        query_losses = np.empty(num_tasks, dtype) if query else None
        accuracies = np.empty(num_tasks, dtype) if query and self.loss == "cross_entropy" else None
        grads = [np.empty(s, dtype) for s in self.shapes] if need_grad or not query else None
        lr_grads = [np.empty(s, dtype) for s in self.shapes] if meta_sgd and need_grad else None
        adapted = np.empty((num_tasks, self.num_params), dtype) if want_adapted else None
        finite = engine.meta_step(
            self._arrays("params", params), lr_arg, algorithm, steps,
            *self._inputs(support_x, support_y),
            *(self._inputs(query_x, query_y) if query else (None, None)), need_grad,
            support_losses, query_losses, accuracies, grads, lr_grads, adapted)
        if not finite:  # a non-finite input stops the engine before it computes anything
            check_batch_values(self.loss, support_x, support_y, query_x, query_y)
        return EngineResult(_tensor(query_losses), _tensor(accuracies),
                            torch.from_numpy(support_losses), _tensors(grads),
                            _tensors(lr_grads), _tensor(adapted), finite)

    def _arrays(self, key: str, tensors: Sequence[Tensor]) -> list:
        """numpy views of parameter tensors (or Meta-SGD's rates), reused while each tensor
        has the same address, shape and strides (a cached view keeps its storage alive, so
        that means the same memory read the same way). New tensors are checked first: the
        shapes are those the engine was built for."""
        layout = [(t.data_ptr(), t.shape, t.stride()) for t in tensors]
        cached = self._arrays_cache.get(key)
        if cached is not None and cached[0] == layout:
            return cached[1]
        check_same_parameters(tensors, self.shapes)
        arrays = [_array(t) for t in tensors]
        if all(t.is_contiguous() and not t.is_neg() for t in tensors):  # views, not copies
            self._arrays_cache[key] = (layout, arrays)
        return arrays


class CompiledMLP(CompiledEngine):
    """The engine for one model: its spec, the adapted layers and the compiled engine
    (which keeps its scratch memory between calls). Build once, call every step."""

    def __init__(self, model: nn.Module, loss: str, adapted: Sequence[bool] | None = None):
        self.model = model
        self.loss = loss
        spec = mlp_spec(model)
        self.reason: str | None = spec if isinstance(spec, str) else None
        self.spec: MlpSpec | None = None if isinstance(spec, str) else spec
        self._engine = None
        if self.spec is None:
            return
        params = list(model.parameters())
        expected = [(l_out, l_in) if i % 2 == 0 or not bias else (l_out,)
                    for l_in, l_out, bias in zip(spec.widths[:-1], spec.widths[1:], spec.has_bias)
                    for i in range(2 if bias else 1)]
        if [tuple(p.shape) for p in params] != expected:  # tied or extra parameters
            self.reason, self.spec = "the model's parameters are not exactly its Linear layers'", None
            return
        self.shapes = [tuple(p.shape) for p in params]
        self.num_params = sum(p.numel() for p in params)
        self._arrays_cache: dict[str, tuple[list[int], list]] = {}
        self.head = 0
        if adapted is not None and not all(adapted):
            head = _head_layer(self.spec, list(adapted))
            if isinstance(head, str):
                self.reason, self.spec = head, None
                return
            self.head = head

    def __getstate__(self):  # the compiled engine (and its scratch memory) is not copied
        return {**self.__dict__, "_engine": None, "_arrays_cache": {}}

    def _engine_for(self, support_x: Tensor, query_x: Tensor | None):
        if self._engine is None:
            spec = self.spec
            self._engine = backends.core().MlpEngine(list(spec.widths), list(spec.activations),
                                                     list(spec.has_bias), self.head, self.loss)
        return self._engine

    def input_reason(self, x: Tensor) -> str | None:
        """None when the engine takes inputs shaped like ``x``, else why not."""
        if x.dtype not in _DTYPES:
            return f"the compiled engine runs float32 and float64, not {x.dtype}"
        if self.spec.flattens_input:
            features = math.prod(x.shape[2:])
        elif x.dim() != 3:
            return f"inputs of shape {tuple(x.shape)} (the MLP engine takes [tasks, samples, features])"
        else:
            features = x.shape[2]
        if features != self.spec.widths[0]:
            return f"inputs with {features} features for a first Linear layer of {self.spec.widths[0]}"
        return None

    def _inputs(self, x: Tensor, y: Tensor):
        num_tasks, num_samples = x.shape[0], x.shape[1]
        if x.dim() != 3:
            x = x.reshape(num_tasks, num_samples, -1)
        check_mse_targets(self.loss, x, y, self.spec.widths[-1])
        return _task_array(x), _task_array(y)


def check_mse_targets(loss: str, x: Tensor, y: Tensor, outputs: int) -> None:
    """mse targets are read flat, as the reference engine reshapes them to the output's
    shape: they must hold one value per output of every sample."""
    num_tasks, num_samples = x.shape[0], x.shape[1]
    if loss == "mse" and y.numel() != num_tasks * num_samples * outputs:
        raise ValueError(f"the targets have shape {tuple(y.shape)} but the model's output has "
                         f"shape {(num_tasks, num_samples, outputs)}")


def check_finite_steps(losses: Tensor, what: str) -> None:
    """``check_finite`` on each column of ``[T, K]`` losses in step order, as the reference
    engine checks each inner step (one fast test when all are finite)."""
    if not bool(torch.isfinite(losses).all()):
        for k in range(losses.shape[1]):
            check_finite(losses[:, k], what)


def _head_layer(spec: MlpSpec, adapted: list[bool]) -> int | str:
    """The first adapted Linear layer when exactly the layers from it on adapt."""
    layer_of = []  # parameter index -> layer index
    for layer, bias in enumerate(spec.has_bias):
        layer_of += [layer] * (2 if bias else 1)
    for head in range(1, spec.num_layers):
        if all(adapted[i] == (layer_of[i] >= head) for i in range(len(adapted))):
            return head
    return "the adapted parameters are not the last Linear layers of the MLP"


def _array(t: Tensor):
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous() or t.is_neg():
        t = t.resolve_neg().contiguous()
    return t.numpy()


def _task_array(t: Tensor):
    """A numpy view of a [T, ...] batch whose tasks are each contiguous (the engine takes
    any distance between tasks: a slice of a larger batch is not copied)."""
    if t.requires_grad:
        t = t.detach()
    if t.is_neg():  # a lazily negated view (numpy() refuses it)
        t = t.resolve_neg()
    a = t.numpy()
    if not a.flags.c_contiguous and not a[0].flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a


def _tensor(a):
    return None if a is None else torch.from_numpy(a)


def _tensors(arrays):
    return None if arrays is None else [torch.from_numpy(a) for a in arrays]
