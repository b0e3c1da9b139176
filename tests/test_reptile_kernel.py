"""The compiled Reptile kernel ``fastmeta._core.reptile_direction`` (out = theta - mean_t w_t)
against its torch twin, on fresh random inputs; its guards; and its determinism across
OpenMP thread counts."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fastmeta
_core = pytest.importorskip("fastmeta._core")
from fastmeta.reptile import reptile_direction

pytestmark = pytest.mark.skipif(not fastmeta.backends.info()["core_available"],
                                reason="fastmeta's compiled core is unavailable or disabled")

TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}


def assert_matches_torch(theta, weights):
    compiled = reptile_direction(theta, weights, engine="cpu")
    reference = reptile_direction(theta, weights, engine="torch")
    assert compiled.shape == theta.shape and compiled.dtype == theta.dtype
    # theta - mean may cancel; measure the error against the size of what was subtracted.
    rtol = TOLERANCE[theta.dtype]
    scale = float(theta.abs().max()) + float(weights.abs().max())
    torch.testing.assert_close(compiled, reference, rtol=rtol, atol=rtol * scale)
    # ... and against float64 arithmetic done by hand.
    exact = theta.double() - weights.double().sum(0) / weights.shape[0]
    torch.testing.assert_close(compiled.double(), exact, rtol=rtol, atol=rtol * scale)
    return compiled


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_tasks", [1, 2, 25])
@pytest.mark.parametrize("num_params", [1, 7, 1001, 2049, 100003])
def test_kernel_matches_torch(dtype, num_tasks, num_params):
    theta = torch.randn(num_params, dtype=dtype)
    weights = theta + 0.1 * torch.randn(num_tasks, num_params, dtype=dtype)
    out = assert_matches_torch(theta, weights)
    if num_tasks == 1:  # one task: exactly theta - w (no averaging round-off)
        assert torch.equal(out, theta - weights[0])


def test_kernel_large_values_and_mixed_signs():
    theta = torch.randn(5000, dtype=torch.float64) * 1e6
    weights = torch.randn(7, 5000, dtype=torch.float64) * 1e6
    assert_matches_torch(theta, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_inputs_are_copied(dtype):
    base_theta = torch.randn(2 * 1001, dtype=dtype)
    theta = base_theta[::2]                                     # stride 2
    weights = torch.randn(1001, 6, dtype=dtype).t()             # transposed [6, 1001]
    assert not theta.is_contiguous() and not weights.is_contiguous()
    out = assert_matches_torch(theta, weights)
    assert out.is_contiguous()
    # The inputs themselves are untouched.
    assert torch.equal(theta, base_theta[::2])


def test_core_rejects_non_contiguous_buffers():
    """Called directly, the core refuses strided buffers rather than reading garbage."""
    theta = np.random.randn(2 * 101)
    weights = np.random.randn(3, 101)
    out = np.empty(101)
    with pytest.raises(ValueError, match="contiguous"):
        _core.reptile_direction(theta[::2], weights, out)
    with pytest.raises(ValueError, match="contiguous"):
        _core.reptile_direction(theta[:101], np.asfortranarray(weights), out)
    with pytest.raises(ValueError, match="contiguous"):
        _core.reptile_direction(theta[:101], np.random.randn(101, 3).T, out)
    with pytest.raises(ValueError, match="contiguous"):
        _core.reptile_direction(theta[:101], weights, np.empty(202)[::2])
    # The contiguous call works and is right.
    _core.reptile_direction(theta[:101], weights, out)
    np.testing.assert_allclose(out, theta[:101] - weights.mean(0), rtol=1e-12, atol=1e-14)


def test_core_rejects_read_only_output():
    out = np.empty(5)
    out.setflags(write=False)
    with pytest.raises((ValueError, BufferError, TypeError)):
        _core.reptile_direction(np.zeros(5), np.zeros((2, 5)), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_propagates_exactly_where_it_is(dtype):
    num_params = 3 * 2048 + 5
    theta = torch.randn(num_params, dtype=dtype)
    weights = torch.randn(4, num_params, dtype=dtype)
    bad = [0, 2047, 2048, num_params - 1]
    for task, p in zip([0, 3, 1, 2], bad):
        weights[task, p] = float("nan")
    theta[17] = float("nan")
    out = reptile_direction(theta, weights, engine="cpu")
    nan = torch.isnan(out)
    assert sorted(nan.nonzero().flatten().tolist()) == sorted(bad + [17])
    keep = ~nan
    expected = reptile_direction(theta, weights, engine="torch")
    torch.testing.assert_close(out[keep], expected[keep], rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype] * 10)


def test_wrapper_dtype_and_shape_errors():
    theta = torch.randn(10)
    with pytest.raises(TypeError, match="float64"):
        reptile_direction(theta, torch.randn(3, 10, dtype=torch.float64), engine="cpu")
    with pytest.raises(TypeError):
        reptile_direction(theta.long(), torch.randn(3, 10).long(), engine="cpu")
    with pytest.raises(TypeError):
        reptile_direction(theta.half(), torch.randn(3, 10).half(), engine="cpu")
    with pytest.raises(ValueError, match="task_weights"):
        reptile_direction(theta, torch.randn(3, 11), engine="cpu")
    with pytest.raises(ValueError):
        reptile_direction(theta, torch.randn(10), engine="cpu")
    with pytest.raises(ValueError):
        reptile_direction(theta.reshape(2, 5), torch.randn(3, 10), engine="cpu")
    with pytest.raises(ValueError, match="no tasks"):
        reptile_direction(theta, torch.randn(0, 10), engine="cpu")


def test_core_dtype_and_shape_errors():
    theta, weights, out = np.zeros(10), np.zeros((3, 10)), np.zeros(10)
    with pytest.raises(TypeError):  # mixed float64 / float32
        _core.reptile_direction(theta, weights.astype(np.float32), out)
    with pytest.raises(TypeError):
        _core.reptile_direction(theta, weights, out.astype(np.float32))
    with pytest.raises(TypeError):  # integers
        _core.reptile_direction(theta.astype(np.int64), weights.astype(np.int64),
                                out.astype(np.int64))
    with pytest.raises(TypeError):
        _core.reptile_direction(theta.astype(np.float16), weights.astype(np.float16),
                                out.astype(np.float16))
    with pytest.raises(ValueError):  # P disagrees
        _core.reptile_direction(theta, np.zeros((3, 11)), out)
    with pytest.raises(ValueError):
        _core.reptile_direction(theta, weights, np.zeros(9))
    with pytest.raises(ValueError):  # ranks
        _core.reptile_direction(theta, np.zeros(10), out)
    with pytest.raises(ValueError):
        _core.reptile_direction(theta.reshape(2, 5), weights, out)
    with pytest.raises(ValueError):  # no tasks
        _core.reptile_direction(theta, np.zeros((0, 10)), out)


_THREADS_SCRIPT = textwrap.dedent("""
    import hashlib, sys
    import torch
    from fastmeta.reptile import reptile_direction
    from fastmeta import backends
    generator = torch.Generator().manual_seed(1234)
    out = []
    for dtype in (torch.float32, torch.float64):
        theta = torch.randn(100003, generator=generator, dtype=dtype)
        weights = torch.randn(25, 100003, generator=generator, dtype=dtype)
        out.append(reptile_direction(theta, weights, engine="cpu").numpy().tobytes())
    print(backends.info()["max_threads"], hashlib.sha256(b"".join(out)).hexdigest())
""")


def test_bitwise_identical_across_thread_counts():
    """P = 100003 > 4 * 2048 runs the kernel's OpenMP loop; 1 and 2 threads must agree bit
    for bit (each parameter is summed by one thread, always in task order)."""
    digests = {}
    for threads in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
        result = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        reported, digest = result.stdout.split()
        if fastmeta.backends.info().get("openmp"):
            assert int(reported) == threads  # the setting reached the kernel
        digests[threads] = digest
    assert digests[1] == digests[2]
    # ... and this process (whatever its thread count) computes the same bytes.
    generator = torch.Generator().manual_seed(1234)
    out = []
    for dtype in (torch.float32, torch.float64):
        theta = torch.randn(100003, generator=generator, dtype=dtype)
        weights = torch.randn(25, 100003, generator=generator, dtype=dtype)
        out.append(reptile_direction(theta, weights, engine="cpu").numpy().tobytes())
    assert hashlib.sha256(b"".join(out)).hexdigest() == digests[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("model_kind", ["mlp", "conv4"])
def test_reptile_cpu_backend_equals_torch_backend(dtype, model_kind):
    if model_kind == "mlp":
        model = fastmeta.models.mlp([1, 16, 16, 1], "relu").to(dtype)
        sx = torch.randn(5, 8, 1, dtype=dtype)
        sy = torch.randn(5, 8, 1, dtype=dtype)
        loss = "mse"
    else:
        model = fastmeta.models.conv4(in_channels=1, n_way=3, hidden=4, image_size=16).to(dtype)
        sx = torch.randn(3, 3, 1, 16, 16, dtype=dtype)
        sy = torch.randint(0, 3, (3, 3))
        loss = "cross_entropy"
    grads, values = {}, {}
    for backend in ("cpu", "torch"):
        reptile = fastmeta.Reptile(model, 0.1, inner_steps=3, loss=loss, backend=backend)
        model.zero_grad(set_to_none=True)
        value = reptile(sx, sy)
        value.backward()
        grads[backend] = [p.grad.clone() for p in model.parameters()]
        values[backend] = value.detach()
    rtol = TOLERANCE[dtype]
    # The compiled MLP engine sums in its own order: equal to rounding, not bitwise.
    value_rtol = {torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(values["cpu"], values["torch"], rtol=value_rtol, atol=0)
    for g_cpu, g_torch, p in zip(grads["cpu"], grads["torch"], model.parameters()):
        assert g_cpu.dtype == p.dtype and g_cpu.shape == p.shape
        scale = float(p.detach().abs().max()) + 1.0
        torch.testing.assert_close(g_cpu, g_torch, rtol=rtol, atol=rtol * scale)
    assert any(float(g.abs().max()) > 0 for g in grads["cpu"])
