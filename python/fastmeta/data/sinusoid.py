"""Sinusoid regression (Finn et al. 2017, section 5.1)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class SinusoidTasks(NamedTuple):
    support_x: Tensor   # [T, K, 1]
    support_y: Tensor   # [T, K, 1]
    query_x: Tensor     # [T, Q, 1]
    query_y: Tensor     # [T, Q, 1]
    amplitude: Tensor   # [T]
    phase: Tensor       # [T]


class Sinusoid:
    """Tasks y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5].

    ``sample(meta_batch)`` draws a meta-batch with ``k_shot`` support and ``q_query`` query
    points per task. Seeded: the same seed gives the same stream of tasks, and ``state()``
    / ``load_state()`` let a resumed run continue the stream exactly.
    """

    amplitude_range = (0.1, 5.0)
    phase_range = (0.0, math.pi)
    x_range = (-5.0, 5.0)

    def __init__(self, k_shot: int = 10, q_query: int = 10, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        _check_sizes(k_shot=k_shot, q_query=q_query)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"Sinusoid: dtype must be a floating-point torch.dtype, got {dtype!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"Sinusoid: seed must be an integer in [0, 2^63), got {seed!r}")
        self.k_shot, self.q_query, self.dtype = k_shot, q_query, dtype
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self, shape, low: float, high: float) -> Tensor:
        return torch.rand(shape, generator=self.generator, dtype=torch.float64) * (high - low) + low

    def sample(self, meta_batch: int, k_shot: int | None = None, q_query: int | None = None,
               device: torch.device | str = "cpu") -> SinusoidTasks:
        if isinstance(meta_batch, bool) or not isinstance(meta_batch, int) or meta_batch < 1:
            raise ValueError(f"Sinusoid: meta_batch must be a positive integer, got {meta_batch!r}")
        k = self.k_shot if k_shot is None else k_shot
        q = self.q_query if q_query is None else q_query
        _check_sizes(k_shot=k, q_query=q)
        amplitude = self._uniform(meta_batch, *self.amplitude_range)
        phase = self._uniform(meta_batch, *self.phase_range)
        x = self._uniform((meta_batch, k + q, 1), *self.x_range)
        y = amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
        x, y = (t.to(device=device, dtype=self.dtype) for t in (x, y))
        return SinusoidTasks(x[:, :k], y[:, :k], x[:, k:], y[:, k:],
                             amplitude.to(self.dtype), phase.to(self.dtype))

    @staticmethod
    def curve(amplitude: float, phase: float, x: Tensor) -> Tensor:
        return amplitude * torch.sin(x - phase)

    def state(self) -> Tensor:
        return self.generator.get_state()

    def load_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


def _check_sizes(**sizes) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Sinusoid: {name} must be a positive integer, got {value!r}")
