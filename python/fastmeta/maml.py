"""MAML (second- and first-order), Meta-SGD and ANIL: one inner loop, three ways to adapt."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastmeta import backends
from fastmeta.checks import (check_batch_values, check_same_parameters, check_task_batch,
                             output_classes, reference_parameter)
from fastmeta.engine_cpu import CompiledEngine
from fastmeta.engines import compiled_engine
from fastmeta.functional import TaskBatchedModel, flatten_sequential, parameter_list
from fastmeta.losses import LOSSES, check_finite, per_task_loss
from fastmeta.precomputed import with_gradient
from fastmeta.reference import AdaptedModel, adapt


def _check_settings(inner_lr, inner_steps: int, loss: str) -> None:
    if (isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)) or not inner_lr > 0
            or inner_lr == float("inf")):
        raise ValueError(f"inner_lr must be a finite positive number, got {inner_lr!r}")
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps must be a positive integer, got {inner_steps!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


class MAML(nn.Module):
    """Model-Agnostic Meta-Learning (Finn et al. 2017).

    ``loss = maml(support_x, support_y, query_x, query_y)`` adapts a copy of ``model`` to
    every task with ``inner_steps`` SGD steps on its support set and returns the mean query
    loss over tasks; ``loss.backward()`` puts the meta-gradient (second-order unless
    ``first_order``) into ``model``'s ``.grad``.
    """

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int = 1,
                 first_order: bool = False, loss: str = "mse", backend: str = "auto"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        _check_settings(inner_lr, inner_steps, loss)
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.first_order = bool(first_order)
        self.loss = loss
        self.backend = backends.check_backend_name(backend)
        self._batched = TaskBatchedModel(model)  # (reads the model's layers now, once)
        self._param_shapes = [tuple(p.shape) for p in model.parameters()]
        self._num_classes = output_classes(model)
        self._compiled: CompiledEngine | None = None  # built on first use
        self._cpu_inputs: tuple | None = None  # see _resolve
        #: the engine that ran the last forward: "cpu" (compiled core) or "torch"
        self.last_backend: str | None = None

    # What the variants change -------------------------------------------------------------
    def _inner_lrs(self) -> list:
        return [self.inner_lr] * len(self._batched.names)

    def _adapted(self) -> list[bool] | None:
        return None  # every parameter adapts

    def _features_from(self) -> int:
        return 0

    def _check_rates(self, like: Tensor) -> None:
        """Learned inner learning rates (Meta-SGD) must live with the weights."""

    def _compiled_engine(self) -> CompiledEngine:
        if self._compiled is None or self._compiled.loss != self.loss:
            self._compiled = compiled_engine(self.model, self.loss, self._adapted())
        return self._compiled

    def _compiled_reason(self, support_x: Tensor | None = None) -> str | None:
        """None when a compiled engine can run this model (and these inputs)."""
        compiled = self._compiled_engine()
        if compiled.reason is not None:
            return compiled.reason
        return None if support_x is None else compiled.input_reason(support_x)

    # The algorithm ---------------------------------------------------------------------------
    def _validate(self, support_x, support_y, query_x=None, query_y=None, params=None,
                  reference_only: bool = False) -> str:
        """Validates a meta-batch and returns the engine that serves it ("cpu" or "torch"):
        "torch" when ``reference_only``. ``params``: ``list(self.model.parameters())`` when
        the caller already has it."""
        if params is None:
            params = parameter_list(self.model)
        like = reference_parameter(self.model, params)
        check_task_batch(like, self.loss, self._num_classes, support_x, support_y,
                         query_x, query_y, scan_values=False)
        self._batched.check_model_takes(support_x)
        self._check_rates(like)
        if reference_only:
            check_same_parameters(params, self._param_shapes)
            engine = "torch"
        else:  # (the compiled engines give no gradient for inputs or targets)
            inputs_grad = torch.is_grad_enabled() and (
                support_x.requires_grad or support_y.requires_grad or query_x.requires_grad
                or query_y.requires_grad)
            engine = self._resolve(like, support_x, params, inputs_grad)
        if engine == "torch":  # the compiled engine scans the values as it reads them
            check_batch_values(self.loss, support_x, support_y, query_x, query_y)
        return engine

    def _resolve(self, like: Tensor, support_x: Tensor, params: list[Tensor],
                 inputs_grad: bool) -> str:
        """``backends.resolve`` for this call; a "cpu" answer is remembered for inputs of the
        same kind (it has no side effects, and a meta-step on a small model is short; the
        compiled engine checks the parameters' shapes whenever they are new tensors).
        ``inputs_grad``: the batch holds tensors that require grad."""
        key = (self.backend, self.loss, like.device, like.dtype, tuple(support_x.shape[2:]),
               inputs_grad)
        # (Hooks, transforms and autocast come and go between calls: checked every time.)
        reason = self._batched.hooks() or backends.context_reason(like, support_x)
        if reason is None and self._compiled is not None and self._cpu_inputs == (self._compiled, key):
            return "cpu"
        check_same_parameters(params, self._param_shapes)
        if reason is None:
            reason = ("inputs or targets require grad (the compiled engine computes no gradient "
                      "for them)" if inputs_grad else self._compiled_reason(support_x))
        engine = backends.resolve(self.backend, like.device, reason)
        self._cpu_inputs = (self._compiled, key) if engine == "cpu" else None
        return engine

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> AdaptedModel:
        """The per-task adapted models; ``adapted(query_x)`` gives ``[T, Q, out]``."""
        self._validate(support_x, support_y, reference_only=True)
        return self._adapt(support_x, support_y, self.inner_steps if steps is None else steps)

    def _adapt(self, support_x: Tensor, support_y: Tensor, steps: int) -> AdaptedModel:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        create_graph = not self.first_order and torch.is_grad_enabled()
        return adapt(self._batched, list(self.model.parameters()), support_x, support_y,
                     self.loss, self._inner_lrs(), steps, create_graph, self._adapted(),
                     self._features_from())

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                query_y: Tensor) -> Tensor:
        if query_x is None or query_y is None:
            raise ValueError("query_x and query_y are required: the meta-loss is the query loss")
        params = parameter_list(self.model)
        engine = self._validate(support_x, support_y, query_x, query_y, params)
        if engine != self.last_backend:  # (nn.Module's __setattr__ costs microseconds)
            self.last_backend = engine
        if engine == "cpu":
            return self._compiled_forward(params, support_x, support_y, query_x, query_y)
        adapted = self._adapt(support_x, support_y, self.inner_steps)
        losses = per_task_loss(self.loss, adapted(query_x), query_y)
        check_finite(losses, "the query loss")
        if not any(p.requires_grad for p in self.parameters()):
            # Nothing to meta-learn (every weight frozen): as in torch, and as on the
            # compiled engine, a loss without a graph (the inner loop's graph is internal).
            return losses.mean().detach()
        return losses.mean()

    def _compiled_forward(self, params: list[Tensor], support_x: Tensor, support_y: Tensor,
                          query_x: Tensor, query_y: Tensor) -> Tensor:
        """The same meta-step on the compiled engine, its meta-gradient handed to autograd."""
        lrs = self._inner_lrs()
        meta_sgd = isinstance(lrs[0], Tensor)
        trained = params + lrs if meta_sgd else params
        need_grad = torch.is_grad_enabled() and any(p.requires_grad for p in trained)
        result = self._compiled_engine().run(
            params, lrs if meta_sgd else self.inner_lr, self.inner_steps,
            "first_order" if self.first_order else "second_order", support_x, support_y,
            query_x, query_y, need_grad)
        result.check_finite()
        value = result.query_losses.mean()
        if not need_grad:
            return value
        return with_gradient(value, trained, result.grads + result.lr_grads if meta_sgd
                             else result.grads)


class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017): MAML with a learned inner learning rate for every weight.

    The rates are parameters of this wrapper (``metasgd.inner_lrs``), so an optimizer over
    ``metasgd.parameters()`` learns them with the initial weights.
    """

    def __init__(self, model: nn.Module, inner_lr_init: float = 0.01, inner_steps: int = 1,
                 first_order: bool = False, loss: str = "mse", backend: str = "auto"):
        super().__init__(model, inner_lr_init, inner_steps, first_order, loss, backend)
        try:
            rates = [torch.full_like(p, float(inner_lr_init)) for p in model.parameters()]
        except RuntimeError as error:  # e.g. 1e300 in float32
            raise ValueError(f"inner_lr_init={inner_lr_init!r} does not fit the model's "
                             f"parameters: {error}") from None
        self.inner_lrs = nn.ParameterList([nn.Parameter(rate) for rate in rates])

    def _inner_lrs(self) -> list:
        return list(self.inner_lrs)

    def _check_rates(self, like: Tensor) -> None:
        # (torch would promote float32 rates on float64 weights; the engine would refuse)
        for rate in self.inner_lrs:
            if rate.dtype != like.dtype or rate.device != like.device:
                raise TypeError(f"the inner learning rates are {rate.dtype} on {rate.device} but "
                                f"the model is {like.dtype} on {like.device}: convert the learner "
                                f"(e.g. metasgd.double(), metasgd.to(device)), not only the model")


class ANIL(MAML):
    """Almost No Inner Loop (Raghu et al. 2019): only the head adapts in the inner loop.

    ``head`` is the name of a submodule of ``model`` (as in ``model.named_modules()``), the
    submodule itself, or None for the last ``nn.Linear``. When ``model`` is an
    ``nn.Sequential`` whose head is its final layers, the body's features are computed once
    per task rather than at every inner step.
    """

    def __init__(self, model: nn.Module, head: str | nn.Module | None = None,
                 inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = False,
                 loss: str = "mse", backend: str = "auto"):
        super().__init__(model, inner_lr, inner_steps, first_order, loss, backend)
        head_module = _find_head(model, head)
        head_params = {id(p) for p in head_module.parameters()}
        if not head_params:
            raise ValueError(f"ANIL: the head {type(head_module).__name__} has no parameters")
        self._adapted_mask = [id(p) in head_params for p in model.parameters()]
        self._head_layer = _suffix_start(model, head_module)

    def _adapted(self) -> list[bool]:
        return self._adapted_mask

    def _features_from(self) -> int:
        return self._head_layer if self._batched.batched else 0


def _find_head(model: nn.Module, head) -> nn.Module:
    if head is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("ANIL: the model has no nn.Linear layer to use as the head; pass head=")
        return linears[-1]
    if isinstance(head, nn.Module):
        if not any(m is head for m in model.modules()):
            raise ValueError("ANIL: head is not a submodule of model")
        return head
    modules = dict(model.named_modules())
    if head not in modules:
        raise ValueError(f"ANIL: model has no submodule named {head!r}; it has {sorted(modules)[1:]}")
    return modules[head]


def _suffix_start(model: nn.Module, head: nn.Module) -> int:
    """The index of the head's first layer when it forms the tail of a Sequential, else 0."""
    layers = flatten_sequential(model)
    if not layers:
        return 0
    head_layers = flatten_sequential(head) or [head]
    start = len(layers) - len(head_layers)
    if start > 0 and all(a is b for a, b in zip(layers[start:], head_layers)):
        return start
    return 0
