"""Reptile (Nichol et al. 2018): adapt each task with plain SGD, then move the initial
weights towards the mean of the adapted weights."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastmeta import backends
from fastmeta.checks import (check_same_parameters, check_task_batch, output_classes,
                             reference_parameter)
from fastmeta.engine_cpu import CompiledEngine
from fastmeta.engines import compiled_engine
from fastmeta.functional import TaskBatchedModel
from fastmeta.maml import _check_settings
from fastmeta.precomputed import with_gradient
from fastmeta.reference import AdaptedModel, adapt


class Reptile(nn.Module):
    """``loss = reptile(support_x, support_y)`` returns the mean support loss over tasks at
    the initial weights; ``loss.backward()`` puts ``theta - mean_t phi_t`` into ``.grad``, so
    an SGD step with learning rate eps is exactly ``theta <- theta + eps (mean phi - theta)``.
    """

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int = 5,
                 loss: str = "mse", backend: str = "auto"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        _check_settings(inner_lr, inner_steps, loss)
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.loss = loss
        self.backend = backends.check_backend_name(backend)
        self._batched = TaskBatchedModel(model)  # (reads the model's layers now, once)
        self._param_shapes = [tuple(p.shape) for p in model.parameters()]
        self._compiled: CompiledEngine | None = None  # built on first use
        #: the engine that ran the last forward's inner loop: "cpu" (compiled) or "torch"
        self.last_backend: str | None = None

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> AdaptedModel:
        """The per-task adapted models (first-order: no graph back to the initial weights)."""
        steps = self.inner_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        self._validate(support_x, support_y)
        return self._adapt(support_x, support_y, steps)

    def _validate(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        """Checks the batch and the model; returns the model's first parameter."""
        like = reference_parameter(self.model)
        check_task_batch(like, self.loss, output_classes(self.model), support_x, support_y)
        self._batched.check_model_takes(support_x)
        check_same_parameters(list(self.model.parameters()), self._param_shapes)
        return like

    def _adapt(self, support_x: Tensor, support_y: Tensor, steps: int) -> AdaptedModel:
        params = [p.detach() for p in self.model.parameters()]
        lrs = [self.inner_lr] * len(params)
        return adapt(self._batched, params, support_x, support_y, self.loss, lrs, steps,
                     create_graph=False)

    def forward(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        like = self._validate(support_x, support_y)
        reason = None
        if self.backend != "torch":
            if self._compiled is None or self._compiled.loss != self.loss:
                self._compiled = compiled_engine(self.model, self.loss)
            reason = (self._batched.hooks()
                      or backends.context_reason(like, support_x)
                      or self._compiled.reason or self._compiled.input_reason(support_x))
        engine = backends.resolve(self.backend, like.device, reason)
        if engine == "cpu":
            self.last_backend = "cpu"
            return self._compiled_forward(support_x, support_y)
        self.last_backend = "torch"
        adapted = self._adapt(support_x, support_y, self.inner_steps)
        params = list(self.model.parameters())
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        num_tasks = support_x.shape[0]
        task_weights = torch.cat([w.detach().reshape(num_tasks, -1) for w in adapted.fast_weights], 1)
        direction = reptile_direction(theta, task_weights)  # (the reference twin)
        grads = [g.view_as(p) for g, p in zip(direction.split([p.numel() for p in params]), params)]
        return with_gradient(adapted.support_losses[0].mean(), params, grads)

    def _compiled_forward(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        """The compiled engine's inner loops; it applies the reptile_direction kernel itself."""
        params = list(self.model.parameters())
        result = self._compiled.run(params, self.inner_lr, self.inner_steps, "reptile",
                                    support_x, support_y)
        result.check_finite()
        return with_gradient(result.support_losses[:, 0].mean(), params, result.grads)


def reptile_direction(theta: Tensor, task_weights: Tensor, engine: str = "torch") -> Tensor:
    """``theta - task_weights.mean(0)`` for ``theta [P]`` and ``task_weights [T, P]``.

    ``engine="cpu"`` runs the compiled kernel (CPU, float32/float64, contiguous inputs are
    copied first); ``"torch"`` is its reference twin.
    """
    if theta.dim() != 1 or task_weights.dim() != 2 or task_weights.shape[1] != theta.shape[0]:
        raise ValueError(f"expected theta [P] and task_weights [T, P], got {tuple(theta.shape)} "
                         f"and {tuple(task_weights.shape)}")
    if task_weights.shape[0] == 0:
        raise ValueError("task_weights has no tasks")
    if theta.dtype != task_weights.dtype:
        raise TypeError(f"theta is {theta.dtype} but task_weights is {task_weights.dtype}")
    if engine == "torch":
        return theta - task_weights.mean(0)
    if theta.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the compiled Reptile kernel takes float32 or float64, got {theta.dtype}")
    if theta.device.type != "cpu" or task_weights.device.type != "cpu":
        raise ValueError("the compiled Reptile kernel runs on CPU tensors")
    theta = theta.detach().contiguous()
    task_weights = task_weights.detach().contiguous()
    out = torch.empty_like(theta)
    backends.core().reptile_direction(theta.numpy(), task_weights.numpy(), out.numpy())
    return out
