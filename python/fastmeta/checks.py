"""Input validation: every bad argument is caught here, in Python, before any pointer can
reach the compiled core. Errors name the argument (and the task index for NaN)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn


def reference_parameter(model: nn.Module, params: Sequence[Tensor] | None = None) -> Tensor:
    """The model's first parameter, after checking all share its dtype and device.
    ``params``: ``list(model.parameters())`` when the caller already has it."""
    if params:  # the common case, without walking the module tree again
        first = params[0]
        dtype, device = first.dtype, first.device
        if all(p.dtype == dtype and p.device == device for p in params):
            return first
    first = None
    for name, p in model.named_parameters():
        if first is None:
            first = p
        elif p.dtype != first.dtype or p.device != first.device:
            raise TypeError(f"model parameter {name!r} is {p.dtype} on {p.device}, but others are "
                            f"{first.dtype} on {first.device}")
    if first is None:
        raise ValueError(f"the model {type(model).__name__} has no parameters to meta-learn")
    return first


def check_inputs(name: str, x: Tensor, like: Tensor, num_tasks: int | None,
                 scan_values: bool = True) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_dense(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dtype != like.dtype:
        raise TypeError(f"{name} is {x.dtype} but the model's parameters are {like.dtype}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the model's parameters are on {like.device}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [tasks, samples, ...], got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)} (need at least one task and one sample)")
    if num_tasks is not None and x.shape[0] != num_tasks:
        raise ValueError(f"{name} has {x.shape[0]} tasks but the support set has {num_tasks}")
    if scan_values:
        check_no_nan(name, x)


def check_dense(name: str, x: Tensor) -> None:
    """A dense (strided) tensor with values: not sparse, mkldnn, nested or on "meta"."""
    if x.layout != torch.strided or x.is_nested:
        layout = "nested" if x.is_nested else str(x.layout).replace("torch.", "")
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {layout} one")
    if x.is_meta:
        raise ValueError(f"{name} is on the meta device: it has no values to learn from")


def check_no_nan(name: str, x: Tensor) -> None:
    if x.requires_grad:
        x = x.detach()
    # The common case in one reduction: a sum is finite only if every term is (NaN and
    # infinities propagate); an overflowing sum of finite values takes the exact test.
    if math.isfinite(x.sum()):
        return
    bad = ~torch.isfinite(x).reshape(x.shape[0], -1).all(1)
    if not bool(bad.any()):
        return
    task = int(bad.nonzero()[0, 0])
    raise FloatingPointError(f"{name} contains NaN or infinity (task {task})")


def check_targets(name: str, y: Tensor, x: Tensor, loss: str, num_classes: int | None,
                  scan_values: bool = True) -> None:
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    check_dense(name, y)
    if y.device != x.device:
        raise ValueError(f"{name} is on {y.device} but the inputs are on {x.device}")
    if tuple(y.shape[:2]) != tuple(x.shape[:2]):
        raise ValueError(f"{name} has shape {tuple(y.shape)}, which does not match the inputs' "
                         f"[tasks, samples] = {tuple(x.shape[:2])}")
    if loss == "cross_entropy":
        if y.dtype != torch.int64:
            raise TypeError(f"{name} must hold int64 class indices for cross_entropy, got {y.dtype}")
        if y.dim() != 2:
            raise ValueError(f"{name} must have shape [tasks, samples] for cross_entropy, got {tuple(y.shape)}")
        low, high = (int(v) for v in torch.aminmax(y))
        if low < 0 or (num_classes is not None and high >= num_classes):
            bound = "" if num_classes is None else f" < {num_classes} (the model's outputs)"
            raise ValueError(f"{name} holds labels in [{low}, {high}], outside 0 <= label{bound}")
    else:
        if not y.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor for mse, got {y.dtype}")
        if y.dtype != x.dtype:
            raise TypeError(f"{name} is {y.dtype} but the inputs are {x.dtype}")
        if scan_values:
            check_no_nan(name, y)


def check_task_batch(model_param: Tensor, loss: str, num_classes: int | None,
                     support_x: Tensor, support_y: Tensor,
                     query_x: Tensor | None = None, query_y: Tensor | None = None,
                     scan_values: bool = True) -> None:
    """Validates a meta-batch: shapes, dtypes, devices, label ranges and (``scan_values``)
    NaN. The compiled engine scans the values itself, in the same pass that reads them,
    and its caller runs :func:`check_batch_values` only when that scan fails."""
    check_inputs("support_x", support_x, model_param, None, scan_values)
    check_targets("support_y", support_y, support_x, loss, num_classes, scan_values)
    if query_x is not None:
        check_inputs("query_x", query_x, model_param, support_x.shape[0], scan_values)
        if tuple(query_x.shape[2:]) != tuple(support_x.shape[2:]):
            raise ValueError(f"query_x samples have shape {tuple(query_x.shape[2:])} but support_x "
                             f"samples have {tuple(support_x.shape[2:])}")
        if query_y is None:
            raise ValueError("query_y is required with query_x")
        check_targets("query_y", query_y, query_x, loss, num_classes, scan_values)
    elif query_y is not None:
        raise ValueError("query_x is required with query_y")


def check_batch_values(loss: str, support_x: Tensor, support_y: Tensor,
                       query_x: Tensor | None = None, query_y: Tensor | None = None) -> None:
    """The NaN/infinity part of :func:`check_task_batch`, in the same order."""
    for name, x, y in (("support", support_x, support_y), ("query", query_x, query_y)):
        if x is not None:
            check_no_nan(f"{name}_x", x)
            if loss != "cross_entropy":
                check_no_nan(f"{name}_y", y)


def output_classes(model: nn.Module) -> int | None:
    """The output width of an nn.Sequential whose last Linear layer is followed only by
    element-wise layers (activations, Identity), else None."""
    from fastmeta.functional import flatten_sequential

    layers = flatten_sequential(model) or []
    while layers and type(layers[-1]) in _SHAPE_PRESERVING:
        layers = layers[:-1]
    if layers and isinstance(layers[-1], nn.Linear):
        return layers[-1].out_features
    return None


# Layers that keep their input's shape, value by value.
_SHAPE_PRESERVING = (nn.Identity, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU,
                nn.SiLU, nn.Softplus, nn.Dropout)


def check_same_parameters(params: Sequence[Tensor], shapes: Sequence[tuple[int, ...]]) -> None:
    """The learner's parameters still have the shapes they had when it was built (it read
    the model's layers then: a layer replaced since would be used stale)."""
    now = [tuple(p.shape) for p in params]
    if now != list(shapes):
        raise ValueError(f"the model's parameters changed since the learner was built (shapes "
                         f"{list(shapes)}, now {now}); build a new learner for the changed model")
