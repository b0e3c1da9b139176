"""Per-task losses: model output ``[T, N, ...]`` and targets give one mean loss per task ``[T]``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("mse", "cross_entropy")


def per_task_loss(kind: str, output: Tensor, target: Tensor) -> Tensor:
    if kind == "mse":
        if target.numel() != output.numel():
            raise ValueError(f"the targets have shape {tuple(target.shape)} but the model's "
                             f"output has shape {tuple(output.shape)}")
        diff = output - target.reshape(output.shape)
        return (diff * diff).flatten(1).mean(1)
    num_tasks, num_samples, num_classes = output.shape[0], output.shape[1], output.shape[-1]
    if int(target.max()) >= num_classes:  # a model whose width checks.py could not read
        raise ValueError(f"the labels reach {int(target.max())} but the model has only "
                         f"{num_classes} outputs")
    flat = F.cross_entropy(output.reshape(num_tasks * num_samples, -1), target.reshape(-1),
                           reduction="none")
    return flat.reshape(num_tasks, num_samples).mean(1)


def per_task_accuracy(output: Tensor, target: Tensor) -> Tensor:
    """Fraction of correct arg-max predictions per task, ``[T]``."""
    return (output.argmax(-1) == target).to(output.dtype).mean(1)


def check_finite(losses: Tensor, what: str) -> None:
    """Raises FloatingPointError naming the first task whose loss is NaN or infinite."""
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        task = int((~finite).nonzero()[0, 0])
        raise FloatingPointError(f"{what} is {float(losses.detach()[task])} for task {task}")
