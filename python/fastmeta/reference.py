"""The torch reference engine: the inner loop of every gradient-based algorithm, batched
over tasks. It is both the fallback where the compiled core cannot serve and the oracle the
compiled kernels are tested against.

MAML's second-order meta-gradient comes from autograd differentiating through the inner
updates (``create_graph=True``); first-order MAML and Reptile treat each inner gradient as a
constant.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fastmeta.checks import check_inputs
from fastmeta.functional import TaskBatchedModel
from fastmeta.losses import check_finite, per_task_loss


class AdaptedModel:
    """The per-task adapted models of a meta-batch: ``adapted(x)`` maps ``[T, N, *in]`` to
    ``[T, N, out]``, task t running on its own fast weights. Gradients flow back to the
    initial weights (and learned learning rates) unless the adaptation was first-order."""

    def __init__(self, model: TaskBatchedModel, fast_weights: list[Tensor],
                 support_losses: list[Tensor], input_shape: tuple[int, ...]):
        self.model = model
        self.fast_weights = fast_weights
        #: the shape of one input (the support set's ``x.shape[2:]``)
        self.input_shape = tuple(input_shape)
        #: the mean support loss of each task ``[T]`` before each inner step, detached
        self.support_losses = support_losses

    @property
    def num_tasks(self) -> int:
        return self.fast_weights[0].shape[0]

    def named_fast_weights(self) -> dict[str, Tensor]:
        return dict(zip(self.model.names, self.fast_weights))

    def __call__(self, x: Tensor) -> Tensor:
        # The learners' own checks, so a bad query gives the same clear errors as a bad batch.
        check_inputs("x", x, self.fast_weights[0], None, scan_values=False)
        if x.shape[0] != self.num_tasks:
            raise ValueError(f"the adapted model holds {self.num_tasks} tasks, got inputs for {x.shape[0]}")
        if tuple(x.shape[2:]) != self.input_shape:
            raise ValueError(f"x must have shape [{self.num_tasks}, samples, "
                             f"{', '.join(map(str, self.input_shape))}] like the support set, "
                             f"got {tuple(x.shape)}")
        return self.model(self.fast_weights, x)


def expand_to_tasks(params: Sequence[Tensor], num_tasks: int) -> list[Tensor]:
    """Each parameter shared by every task, ``[T, *shape]`` without a copy."""
    return [p.unsqueeze(0).expand(num_tasks, *p.shape) for p in params]


def adapt(model: TaskBatchedModel, params: Sequence[Tensor], x: Tensor, y: Tensor, loss: str,
          lrs: Sequence[Tensor | float], steps: int, create_graph: bool,
          adapted: Sequence[bool] | None = None, features_from: int = 0) -> AdaptedModel:
    """Runs ``steps`` SGD steps on every task's support loss, all tasks at once.

    ``lrs[i]`` is parameter i's inner learning rate: a float, or a tensor of the parameter's
    shape (Meta-SGD). ``adapted[i]`` False keeps parameter i at its initial value (ANIL's
    body). ``features_from`` > 0 (an ``nn.Sequential`` whose layers before that index are
    not adapted) computes those layers' output once instead of at every step.
    """
    if torch.is_inference_mode_enabled():
        # The inner loop needs autograd, which inference mode switches off: adapt outside it,
        # as under no_grad, on copies of the inputs (inference tensors cannot enter autograd).
        with torch.inference_mode(False), torch.no_grad():
            return adapt(model, params, x.clone(), y.clone(), loss, lrs, steps, False, adapted,
                         features_from)
    num_tasks = x.shape[0]
    grad_enabled = torch.is_grad_enabled()
    if not grad_enabled:
        # Evaluation: no graph back to theta. Copies, not views: the adapted model is a
        # snapshot, which a later optimizer step on the model does not change.
        params = [p.detach().clone() for p in params]
    fast = expand_to_tasks(params, num_tasks)
    which = [i for i in range(len(fast)) if adapted is None or adapted[i]]
    support_losses = []
    with torch.enable_grad():
        for i in which:
            if not fast[i].requires_grad:  # evaluation without a graph to theta
                fast[i] = fast[i].detach().requires_grad_()
        inputs = model(fast, x, stop=features_from) if features_from else x
        for _ in range(steps):
            output = model(fast, inputs, start=features_from)
            losses = per_task_loss(loss, output, y)
            check_finite(losses, "the support loss")
            support_losses.append(losses.detach())
            # Tasks are independent, so the gradient of the sum is every task's own gradient.
            grads = torch.autograd.grad(losses.sum(), [fast[i] for i in which],
                                        create_graph=create_graph)
            for i, grad in zip(which, grads):
                updated = fast[i] - lrs[i] * grad
                fast[i] = updated if updated.requires_grad else updated.requires_grad_()
    if not grad_enabled:
        fast = [f.detach() for f in fast]
    return AdaptedModel(model, fast, support_losses, x.shape[2:])
