"""Shared fixtures and small helpers for fastmeta's tests.

Every test is seeded (``torch.manual_seed``) so its random models and tasks are fresh for
each test yet reproducible. The helpers here build meta-batches of the shapes the API takes:
``x [T, S, *in]`` and ``y [T, S]`` (int64 class indices) or ``y [T, S, out]`` (regression).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

# The tests use tiny models, which gain nothing from intra-op threads; with several threads
# on a busy machine, OpenMP spin-waiting makes them up to 100x slower. One thread keeps the
# suite fast and its timing stable. (The compiled core's own OpenMP threads are tested in a
# subprocess in test_reptile_kernel.py.)
torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    # backend="auto" falling back to the reference engine warns (once per reason): expected.
    config.addinivalue_line(
        "filterwarnings", "ignore:fastmeta. using the torch reference engine:RuntimeWarning")


@pytest.fixture(autouse=True)
def _seed(request):
    """A different but reproducible seed for every test (derived from its node id).

    ``FASTMETA_TEST_SEED=k`` shifts every seed, to check that no test depends on its draw.
    """
    base = int(os.environ.get("FASTMETA_TEST_SEED", "0"))
    name = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid))
    seed = (base * 1_000_003 + name) % (2**31)
    torch.manual_seed(seed)


def regression_batch(num_tasks: int, support: int, query: int, in_features: int,
                     out_features: int, dtype=torch.float64):
    """Random regression tasks: support_x, support_y, query_x, query_y."""
    sx = torch.randn(num_tasks, support, in_features, dtype=dtype)
    sy = torch.randn(num_tasks, support, out_features, dtype=dtype)
    qx = torch.randn(num_tasks, query, in_features, dtype=dtype)
    qy = torch.randn(num_tasks, query, out_features, dtype=dtype)
    return sx, sy, qx, qy


def classification_batch(num_tasks: int, support: int, query: int, in_shape, num_classes: int,
                         dtype=torch.float64):
    """Random classification tasks: inputs ``[T, N, *in_shape]``, int64 labels ``[T, N]``."""
    in_shape = tuple(in_shape) if not isinstance(in_shape, int) else (in_shape,)
    sx = torch.randn(num_tasks, support, *in_shape, dtype=dtype)
    qx = torch.randn(num_tasks, query, *in_shape, dtype=dtype)
    sy = torch.randint(0, num_classes, (num_tasks, support))
    qy = torch.randint(0, num_classes, (num_tasks, query))
    return sx, sy, qx, qy


def snapshot(model: torch.nn.Module):
    """Copies of every parameter and its .grad (None kept as None)."""
    return [(p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
            for p in model.parameters()]


def assert_unchanged(model: torch.nn.Module, before) -> None:
    """Parameters bitwise equal to ``before``, and .grad untouched (None stays None)."""
    for p, (value, grad) in zip(model.parameters(), before):
        assert torch.equal(p.detach(), value), "a parameter changed"
        if grad is None:
            assert p.grad is None, "a .grad appeared"
        else:
            assert p.grad is not None and torch.equal(p.grad, grad), "a .grad changed"
