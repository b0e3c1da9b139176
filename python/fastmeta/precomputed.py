"""Hands gradients that were computed outside autograd (Reptile's direction, the compiled
engine's meta-gradient) to autograd, so ``loss.backward()`` fills ``.grad`` as usual."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class _PrecomputedGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, grads: Sequence[Tensor], *params: Tensor) -> Tensor:
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return (None, None, *[grad_output * g for g in ctx.grads])


def with_gradient(value: Tensor, params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """``value`` (a scalar) whose backward puts ``grads[i]`` (times the incoming gradient)
    into ``params[i]``."""
    return _PrecomputedGradient.apply(value, tuple(grads), *params)
