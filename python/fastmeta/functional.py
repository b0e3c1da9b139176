"""Run a user's model with per-task weights: the batched forward of the reference engine.

Every parameter ``theta_i`` becomes a task-batched tensor ``[T, *theta_i.shape]``. An
``nn.Sequential`` of supported layers runs all tasks at once (batched matrix products,
grouped convolutions -- on the CPU, large ones task by task -- batch norm with per-task
batch statistics); any other module runs task by task through ``torch.func.functional_call``.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _modules

# Activations and how to apply them; each is layout-agnostic (element-wise).
_ELEMENTWISE: dict[type, Callable[[nn.Module, Tensor], Tensor]] = {
    nn.ReLU: lambda m, x: torch.relu(x),
    nn.Tanh: lambda m, x: torch.tanh(x),
    nn.Sigmoid: lambda m, x: torch.sigmoid(x),
    nn.LeakyReLU: lambda m, x: F.leaky_relu(x, m.negative_slope),
    nn.Identity: lambda m, x: x,
}

# Layers whose parameters are (weight, bias), read by position.
_WEIGHTED = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)

# On the CPU, grouped convolutions (one call for all tasks, groups = tasks) and their double
# backward take slow paths, so large convolutions run faster task by task: MAML conv4 with
# 64 filters on 28x28, 16 tasks, is 1.23-1.26x faster as a loop (1 or 2 threads). For small
# ones the loop's per-task overhead dominates and the grouped call wins: the digits model (32
# filters, 8x8) is 1.5-2.1x faster grouped. The crossover, measured over conv nets of 16-128
# filters on 8x8 to 28x28 inputs, lies at channels x height x width of about 8,000 (1 thread)
# to 15,000 (2 threads); which side wins does not change with the number of tasks (4-32).
# Numbers in benchmarks/RESULTS.md. On a GPU convolutions are always grouped.
CPU_PER_TASK_CONV_MIN = 10_000


def conv_work(conv: nn.Conv2d, size: Sequence[int]) -> int:
    """The heuristic's measure of ``conv`` on a ``size`` (height, width) input: out channels x
    height x width (its output elements per sample at stride 1, "same" padding)."""
    return conv.out_channels * int(size[0]) * int(size[1])


def flatten_sequential(module: nn.Module) -> list[nn.Module] | None:
    """The layers of a (possibly nested) ``nn.Sequential``, or None for any other module."""
    if not isinstance(module, nn.Sequential):
        return None
    layers = []
    for child in module:
        inner = flatten_sequential(child)
        layers.extend(inner if inner is not None else [child])
    return layers


def parameter_list(module: nn.Module) -> list[nn.Parameter]:
    """``list(module.parameters())`` (same order, shared parameters once), in a third of the
    time: a meta-step on a small model reads it every call."""
    params: list[nn.Parameter] = []
    _collect_parameters(module, params, set())
    return params


def _collect_parameters(module: nn.Module, params: list, seen: set) -> None:
    # (A module-level function, not a closure: a recursive closure is a reference cycle,
    # which only the garbage collector frees.)
    for p in module._parameters.values():
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    for child in module._modules.values():
        if child is not None:
            _collect_parameters(child, params, seen)


def unsupported_layer(layer: nn.Module) -> str | None:
    """None when the batched Sequential path runs ``layer``, else why not."""
    kind = type(layer)
    if kind in _ELEMENTWISE or kind in (nn.Linear, nn.MaxPool2d, nn.AvgPool2d):
        return None
    if kind is nn.Conv2d:
        return None if layer.padding_mode == "zeros" else f"Conv2d with padding_mode={layer.padding_mode!r}"
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        return None
    if kind is nn.Flatten:
        return None if (layer.start_dim, layer.end_dim) == (1, -1) else "Flatten with start_dim != 1"
    return kind.__name__


# The settings of each layer kind that the engines take from the model when they read it
# (batch norm's eps is read at every call instead).
_SETTINGS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    nn.AvgPool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                   "divisor_override"),
    nn.BatchNorm1d: ("affine", "track_running_stats"),
    nn.BatchNorm2d: ("affine", "track_running_stats"),
    nn.LeakyReLU: ("negative_slope",),
    nn.Flatten: ("start_dim", "end_dim"),
}

# (attrgetter with several names returns their tuple: a tenth of a generator's time)
_READ_SETTINGS = {kind: operator.attrgetter(*names) for kind, names in _SETTINGS.items()
                  if len(names) > 1}
_READ_SETTINGS[nn.LeakyReLU] = lambda layer: (layer.negative_slope,)


def layer_layout(module: nn.Module) -> list[tuple[nn.Module, tuple]] | None:
    """The layers of an ``nn.Sequential`` model (the objects) with their settings: what the
    engines read from it once. None for any other module (it runs through its own forward)."""
    layers = flatten_sequential(module)
    if layers is None:
        return None
    layout = []
    for layer in layers:
        read = _READ_SETTINGS.get(type(layer))
        layout.append((layer, read(layer) if read is not None else ()))
    return layout


def layout_change(before: list, now: list) -> str | None:
    """What differs between two :func:`layer_layout` results of one model, or None."""
    if len(before) != len(now):
        return f"it has {len(now)} layers, not {len(before)}"
    for index, ((old, old_settings), (new, new_settings)) in enumerate(zip(before, now)):
        if new is not old:
            return f"layer {index} is a new {type(new).__name__} (was a {type(old).__name__})"
        if new_settings != old_settings:
            names = [name for name, a, b in zip(_SETTINGS[type(new)], old_settings, new_settings)
                     if a != b]
            return f"layer {index} ({type(new).__name__}) changed its {', '.join(names)}"
    return None


def hook_reason(modules: Sequence[nn.Module]) -> str | None:
    """Why running ``modules``' layers from their weights may differ from calling them: module
    hooks (user hooks, pruning, the hook-based ``spectral_norm``) change inputs, outputs or
    weights, and only a real call runs them. None when no hook is registered."""
    if (_modules._global_forward_hooks or _modules._global_forward_pre_hooks
            or _modules._global_backward_hooks or _modules._global_backward_pre_hooks):
        return "global module hooks are registered"
    for module in modules:
        if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks):
            return f"{type(module).__name__} has hooks (pruning, spectral_norm or user hooks)"
    return None


def parameter_layout_reason(layers: Sequence[nn.Module], count: int) -> str | None:
    """None when every layer holds exactly its own (weight, bias) in that order, as the batched
    path and the compiled engines read them by position; else why not (re-registered or
    shared parameters). ``count``: the model's distinct parameters."""
    total = 0
    for layer in layers:
        names = [name for name, p in layer._parameters.items() if p is not None]
        expected = [name for name in ("weight", "bias") if getattr(layer, name, None) is not None] \
            if isinstance(layer, _WEIGHTED) else []
        if names != expected:
            return f"{type(layer).__name__} holds parameters {names}, not {expected}"
        total += len(names)
    return None if total == count else "layers share parameters"


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _window_output(size: int, kernel: int, stride: int, padding: int, dilation: int,
                   ceil_mode: bool) -> int:
    """torch's output size of a convolution or pooling window along one axis."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1   # the last window must start inside the input or its left padding
    return out


def _layer_output(layer: nn.Module, shape: tuple) -> tuple | str:
    """The sample shape a supported layer makes of ``shape``, or what it expected instead."""
    kind = type(layer)
    if kind in _ELEMENTWISE:
        return shape
    if kind is nn.Flatten:
        return (math.prod(shape),)
    if kind is nn.Linear:
        return shape[:-1] + (layer.out_features,) if shape and shape[-1] == layer.in_features \
            else f"{layer.in_features} features"
    if kind is nn.BatchNorm1d:  # (features,) or (channels, length), as torch's
        return shape if len(shape) in (1, 2) and shape[0] == layer.num_features \
            else f"samples of shape [{layer.num_features}] or [{layer.num_features}, length]"
    takes = layer.in_channels if kind is nn.Conv2d else \
        layer.num_features if kind is nn.BatchNorm2d else None   # (pooling: any channels)
    if len(shape) != 3 or (takes is not None and shape[0] != takes):
        return f"[{'C' if takes is None else takes}, height, width] images"
    if kind is nn.BatchNorm2d:
        return shape
    if kind is nn.Conv2d:
        if layer.padding == "same":
            return (layer.out_channels,) + shape[1:]
        padding = (0, 0) if layer.padding == "valid" else _pair(layer.padding)
        window = (_pair(layer.kernel_size), _pair(layer.stride), padding, _pair(layer.dilation), False)
        channels = layer.out_channels
    else:  # pooling
        stride = layer.stride if layer.stride else layer.kernel_size
        dilation = layer.dilation if kind is nn.MaxPool2d else 1
        window = (_pair(layer.kernel_size), _pair(stride), _pair(layer.padding), _pair(dilation),
                  layer.ceil_mode)
        channels = shape[0]
    kernel, stride, padding, dilation, ceil_mode = window
    size = tuple(_window_output(shape[1 + a], kernel[a], stride[a], padding[a], dilation[a], ceil_mode)
                 for a in (0, 1))
    if min(size) < 1:
        return f"images larger than {shape[1]}x{shape[2]}"
    return (channels,) + size


class TaskBatchedModel:
    """``model(params, x)`` with ``params[i]: [T, *theta_i.shape]`` and ``x: [T, N, *in]``.

    Batch norm layers always use the statistics of each task's current batch.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.names = [name for name, _ in module.named_parameters()]
        #: every module of the model, containers too (their hooks count: see hook_reason)
        self.modules = list(module.modules())
        self.layout = layer_layout(module)  # (None: not an nn.Sequential)
        # For the per-call checks' fast path: the hook dicts (hooks are added to these very
        # objects), every Sequential's children, and the layers that have settings.
        self._hook_dicts = [hooks for m in self.modules for hooks in (
            m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)]
        self._containers = [(m, tuple(m._modules.values())) for m in self.modules
                            if isinstance(m, nn.Sequential)]
        self._settings = [(layer, _READ_SETTINGS[type(layer)], settings)
                          for layer, settings in self.layout or () if settings]
        self._fitting: set[tuple] = set()  # sample shapes input_problem passed
        layers = None if self.layout is None else [layer for layer, _ in self.layout]
        reasons = [] if layers is None else [r for r in map(unsupported_layer, layers) if r]
        if layers is None:
            self.unsupported = f"{type(module).__name__} is not an nn.Sequential"
        elif reasons:
            self.unsupported = f"unsupported layer {reasons[0]}"
        else:
            self.unsupported = parameter_layout_reason(layers, len(self.names))
        self.layers = layers if self.unsupported is None else None
        # Index of each layer's first parameter in named_parameters() order.
        self.param_offsets = []
        if self.layers is not None:
            offset = 0
            for layer in self.layers:
                self.param_offsets.append(offset)
                offset += sum(1 for _ in layer.parameters(recurse=False))

    def input_problem(self, sample: Sequence[int]) -> str | None:
        """Why samples of shape ``sample`` (``x.shape[2:]``) do not fit the layers of an
        ``nn.Sequential`` model, or None (also for other models, which say so themselves)."""
        shape = tuple(sample)
        if self.layers is None or shape in self._fitting:
            return None
        for index, layer in enumerate(self.layers):
            out = _layer_output(layer, shape)
            if isinstance(out, str):
                return (f"samples of shape {list(sample)} do not fit layer {index} "
                        f"({type(layer).__name__}), which takes {out}"
                        + (f"; they reach it as {list(shape)}" if index else ""))
            shape = out
        self._fitting.add(tuple(sample))  # (the layers cannot change: check_unchanged)
        return None

    def check_model_takes(self, x: Tensor) -> None:
        """Raises a ValueError when the model changed since this was built or its layers do
        not take ``x``'s samples (``x: [T, N, *sample]``)."""
        self.check_unchanged()
        problem = self.input_problem(x.shape[2:])
        if problem is not None:
            raise ValueError(f"support_x: {problem}")

    def hooks(self) -> str | None:
        """:func:`hook_reason` for this model (its modules as they were read)."""
        if (any(self._hook_dicts) or _modules._global_forward_hooks
                or _modules._global_forward_pre_hooks or _modules._global_backward_hooks
                or _modules._global_backward_pre_hooks):
            return hook_reason(self.modules)
        return None

    def check_unchanged(self) -> None:
        """Raises a ValueError when the model's layers or their settings changed since this
        was built: both engines would go on running the layers they read."""
        if self.layout is None or (
                all(tuple(seq._modules.values()) == children for seq, children in self._containers)
                and all(read(layer) == settings for layer, read, settings in self._settings)):
            return
        change = layout_change(self.layout, layer_layout(self.module))
        if change is not None:
            raise ValueError(f"the model changed since the learner was built ({change}); build "
                             f"a new learner for the changed model")

    @property
    def batched(self) -> bool:
        """True when all tasks run as one batched computation (the fast path); a model with
        hooks runs task by task, through its own forward (checked at every call: hooks come
        and go)."""
        return self.layers is not None and self.hooks() is None

    def __call__(self, params: Sequence[Tensor], x: Tensor, start: int = 0,
                 stop: int | None = None) -> Tensor:
        if not self.batched:
            if (start, stop) != (0, None):
                raise ValueError("only an nn.Sequential model can be run layer range by layer range")
            return self._per_task(params, x)
        stop = len(self.layers) if stop is None else stop
        if self._convolutions_per_task(x, start, stop):
            return torch.cat([self._sequential([p[t:t + 1] for p in params], x[t:t + 1], start, stop)
                              for t in range(x.shape[0])])
        return self._sequential(params, x, start, stop)

    def _convolutions_per_task(self, x: Tensor, start: int, stop: int) -> bool:
        """Whether layers ``start:stop`` run task by task: on the CPU, for several tasks, when
        their first convolution's :func:`conv_work` is at least :data:`CPU_PER_TASK_CONV_MIN`."""
        if x.device.type != "cpu" or x.dim() < 4 or x.shape[0] == 1:
            return False
        convs = [layer for layer in self.layers[start:stop] if type(layer) is nn.Conv2d]
        return bool(convs) and conv_work(convs[0], x.shape[-2:]) >= CPU_PER_TASK_CONV_MIN

    def _per_task(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        outputs = []
        for t in range(x.shape[0]):
            weights = {name: p[t] for name, p in zip(self.names, params)}
            outputs.append(torch.func.functional_call(self.module, weights, (x[t],)))
        return torch.stack(outputs)

    def _sequential(self, params: Sequence[Tensor], x: Tensor, start: int, stop: int) -> Tensor:
        num_tasks, num_samples = x.shape[0], x.shape[1]
        # Image layers work on "channels" layout [N, T*C, H, W] (task-major channels), so
        # one grouped convolution / pooling / batch norm call serves every task.
        channels_layout = False

        def to_channels(h):
            return h.transpose(0, 1).reshape(num_samples, num_tasks * h.shape[2], *h.shape[3:])

        def to_tasks(h):
            return h.reshape(num_samples, num_tasks, -1, *h.shape[2:]).transpose(0, 1)

        for index in range(start, stop):
            layer = self.layers[index]
            offset = self.param_offsets[index]
            own = params[offset:offset + sum(1 for _ in layer.parameters(recurse=False))]
            kind = type(layer)
            if kind in _ELEMENTWISE:
                x = _ELEMENTWISE[kind](layer, x)
                continue
            if kind in (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d):
                if not channels_layout:
                    x, channels_layout = to_channels(x), True
            elif channels_layout:
                x, channels_layout = to_tasks(x), False

            if kind is nn.Linear:
                x = _linear(x, own[0], own[1] if layer.bias is not None else None)
            elif kind is nn.Conv2d:
                x = _conv2d(layer, x, own[0], own[1] if layer.bias is not None else None, num_tasks)
            elif kind is nn.BatchNorm2d:
                x = _batch_norm(x, own, layer.eps, reduce_dims=(0, 2, 3))
            elif kind is nn.BatchNorm1d:
                x = _batch_norm(x, own, layer.eps, reduce_dims=(1,) + tuple(range(3, x.dim())))
            elif kind is nn.MaxPool2d:
                x = F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                                 ceil_mode=layer.ceil_mode)
            elif kind is nn.AvgPool2d:
                x = F.avg_pool2d(x, layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode,
                                 layer.count_include_pad, layer.divisor_override)
            elif kind is nn.Flatten:
                x = x.reshape(num_tasks, num_samples, -1)
        return to_tasks(x) if channels_layout else x


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x [T, N, ..., in] @ weight[T, out, in]^T + bias[T, out]."""
    shape = x.shape
    flat = x.reshape(shape[0], -1, shape[-1])
    if bias is None:
        out = torch.bmm(flat, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return out.reshape(*shape[:-1], weight.shape[1])


def _conv2d(layer: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None, num_tasks: int) -> Tensor:
    """Every task's convolution as one grouped convolution over task-major channels."""
    weight = weight.reshape(-1, *weight.shape[2:])
    bias = None if bias is None else bias.reshape(-1)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation,
                    layer.groups * num_tasks)


def _batch_norm(x: Tensor, affine: Sequence[Tensor], eps: float, reduce_dims: tuple) -> Tensor:
    """Batch norm with batch statistics (each task-channel normalised over its own batch).

    Channels layout [N, T*C, H, W] goes through ``F.batch_norm`` (plain autograd, no vmap:
    its double backward is exact, checked against finite differences in the tests, and it is
    far faster than the primitive form on the CPU). [T, N, F] and [T, N, C, L] (batch norm over
    samples and length, as torch's BatchNorm1d) are written from primitives.
    """
    weight, bias = affine if affine else (None, None)
    if reduce_dims[0] != 1:
        return F.batch_norm(x, None, None, None if weight is None else weight.reshape(-1),
                            None if bias is None else bias.reshape(-1), True, 0.0, eps)
    mean = x.mean(dim=reduce_dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=reduce_dims, keepdim=True)
    out = centred * torch.rsqrt(var + eps)
    if weight is not None:  # weight, bias [T, F] -> [T, 1, F, 1...]
        shape = (weight.shape[0], 1, weight.shape[1]) + (1,) * (x.dim() - 3)
        out = out * weight.reshape(shape) + bias.reshape(shape)
    return out
