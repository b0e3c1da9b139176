"""Summary statistics for evaluation: a mean and its 95% confidence interval."""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

Z_95 = 1.96


def mean_ci(values: Iterable[float] | torch.Tensor | np.ndarray, z: float = Z_95) -> tuple[float, float]:
    """``(mean, half_width)`` with ``half_width = z * std / sqrt(n)`` (the sample standard
    deviation, ``ddof=1``); the interval is ``mean ± half_width``.

    One value gives an undefined (``nan``) half-width; no values raise ``ValueError``.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values,
                       dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError("mean_ci: no values")
    mean = float(array.mean())
    if array.size == 1:
        return mean, math.nan
    return mean, float(z * array.std(ddof=1) / math.sqrt(array.size))


def format_ci(mean: float, half_width: float, digits: int = 3, signed: bool = False) -> str:
    """``"0.771 ± 0.032"`` (``signed``: ``"+0.010 ± 0.004"``, for a difference)."""
    sign = "+" if signed else ""
    if half_width is None or math.isnan(half_width):
        return f"{mean:{sign}.{digits}f}"
    return f"{mean:{sign}.{digits}f} ± {half_width:.{digits}f}"
