"""Hands gradients that were computed outside autograd (Reptile's direction, the compiled
engine's meta-gradient) to autograd, so ``loss.backward()`` fills ``.grad`` as usual."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class _PrecomputedGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, boxed: tuple[Tensor, Sequence[Tensor]], *params: Tensor) -> Tensor:
        # value and grads come boxed in a tuple: autograd then sees no tensor input but the
        # parameters, and the output needs no copy (it is not one of the inputs).
        value, ctx.grads = boxed
        return value.detach()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if torch.is_grad_enabled():  # (backward runs in grad mode only with create_graph)
            raise RuntimeError(
                "fastmeta: this loss's gradient cannot be differentiated again (create_graph="
                "True): it was computed outside autograd (the compiled engine's meta-gradient, "
                "or Reptile's direction); for higher-order gradients use MAML, Meta-SGD or ANIL "
                "with backend='torch'")
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "fastmeta: this loss's gradient was already used by a backward pass; it is "
                "handed over once (retain_graph=True cannot replay it): run the learner again "
                "for another backward, or use backend='torch'")
        if grad_output.device.type == "cpu" and float(grad_output) == 1.0:
            # The plain loss.backward(): autograd may take these tensors as .grad without a copy.
            return (None, *grads)
        return (None, *[grad_output * g for g in grads])


def with_gradient(value: Tensor, params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """``value`` (a scalar) whose backward puts ``grads[i]`` (times the incoming gradient)
    into ``params[i]`` (once: a second backward raises)."""
    return _PrecomputedGradient.apply((value, tuple(grads)), *params)
