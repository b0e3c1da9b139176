"""pytest-benchmark suite: one meta-step (forward + backward, float32, 2 torch threads).

    pytest benchmarks --benchmark-only

Not part of the test run (pyproject's testpaths is ["tests"]). backend="torch" is the
reference engine: the baseline later work must beat. The backend="cpu" cases (MLP models)
skip, with the reason, while the compiled engine cannot serve them, and run once it can.
"""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_workloads as bw  # noqa: E402

M2_1, M2_5 = bw.Algorithm("maml2", 1), bw.Algorithm("maml2", 5)
FO_1, FO_5 = bw.Algorithm("fomaml", 1), bw.Algorithm("fomaml", 5)
REPTILE_5 = bw.Algorithm("reptile", 5)

# (workload key, algorithm, backends); conv4 only on the reference engine (the compiled
# engine is MLP-only for now).
CASES = [
    ("W1", M2_1, ("torch", "cpu")),
    ("W2", M2_1, ("torch",)),
    ("W3", M2_1, ("torch", "cpu")),
    ("W3", M2_5, ("torch", "cpu")),
    ("W3", FO_1, ("torch", "cpu")),
    ("W3", FO_5, ("torch", "cpu")),
    ("W3", REPTILE_5, ("torch", "cpu")),
]
NAMES = {"W1": "sinusoid", "W2": "omniglot_conv4", "W3": "omniglot_mlp"}
PARAMS = [pytest.param(key, algo, backend, id=f"{NAMES[key]}-{algo.kind}-{algo.steps}step-{backend}")
          for key, algo, backends in CASES for backend in backends]

_workloads: dict[str, bw.Workload] = {}


def workload(key: str) -> bw.Workload:
    if key not in _workloads:
        _workloads[key] = bw.WORKLOADS[key]()
    return _workloads[key]


@pytest.fixture(autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(bw.NUM_THREADS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("key, algo, backend", PARAMS)
def test_meta_step(benchmark, key, algo, backend):
    w = workload(key)
    benchmark.group = f"{NAMES[key]}: {algo.label}"
    benchmark.extra_info.update(workload=w.title, algorithm=algo.label, backend=backend,
                                tasks=w.tasks, useful_gflop=bw.useful_flops(w, algo) / 1e9,
                                threads=bw.NUM_THREADS)
    try:
        # Building runs one meta-step (the availability probe), which also warms up.
        model, step = bw.build(f"fastmeta-{backend}", w, algo)
    except bw.Unavailable as error:
        pytest.skip(f"backend='{backend}' unavailable: {error}")
    if key == "W2":  # seconds per meta-step: a couple of rounds
        benchmark.pedantic(step, rounds=2, iterations=1, warmup_rounds=0)
    else:
        benchmark.pedantic(step, rounds=20 if algo.steps == 1 else 10, iterations=1,
                           warmup_rounds=2)
    grad = bw.meta_gradient(model)
    assert torch.isfinite(grad).all()
