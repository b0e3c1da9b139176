"""Bad input is rejected with a clear error that names the argument, before anything runs,
and leaves the model's parameters and gradients exactly as they were."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta.functional import TaskBatchedModel
from conftest import assert_unchanged, classification_batch, regression_batch, snapshot


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fails the test if any model forward pass starts on the reference engine (batched or
    per task), or if the compiled engine is called and returns instead of raising: it scans
    its inputs for NaN before it computes anything (tests/test_engine_mlp.py checks that it
    then writes nothing), and only that may reach it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model ran although the input should have been rejected")

    monkeypatch.setattr(TaskBatchedModel, "__call__", refuse)
    from fastmeta.engine_cpu import CompiledMLP
    real_run = CompiledMLP.run

    def must_raise(*args, **kwargs):
        real_run(*args, **kwargs)
        refuse()

    monkeypatch.setattr(CompiledMLP, "run", must_raise)


def _classifier(dtype=torch.float64):
    return fastmeta.models.mlp([4, 8, 3], "relu").to(dtype)


def _regressor(dtype=torch.float64):
    return fastmeta.models.mlp([2, 8, 1], "tanh").to(dtype)


def _with_stale_grads(model):
    """Half the parameters carry an old .grad, the others none: both must survive."""
    for i, p in enumerate(model.parameters()):
        if i % 2 == 0:
            p.grad = torch.randn_like(p)
    return model


ALGORITHMS = ["maml", "fomaml", "metasgd", "anil"]


def _make(algorithm, model, loss, backend="torch", **kwargs):
    if algorithm == "maml":
        return fastmeta.MAML(model, 0.1, loss=loss, backend=backend, **kwargs)
    if algorithm == "fomaml":
        return fastmeta.MAML(model, 0.1, first_order=True, loss=loss, backend=backend, **kwargs)
    if algorithm == "metasgd":
        return fastmeta.MetaSGD(model, 0.1, loss=loss, backend=backend, **kwargs)
    return fastmeta.ANIL(model, inner_lr=0.1, loss=loss, backend=backend, **kwargs)


def _bad_classification_batches():
    """(description, batch modifier, error type, message pattern) for a 3-class problem."""
    def replace(index, make):
        def modify(batch):
            batch = list(batch)
            batch[index] = make(batch)
            return batch
        return modify

    def with_value(index, position, value):
        def make(batch):
            t = batch[index].clone()
            t[position] = value
            return t
        return replace(index, make)

    return [
        ("query has fewer tasks", replace(2, lambda b: b[2][:2]), ValueError, "query_x"),
        ("support_y has fewer tasks", replace(1, lambda b: b[1][:2]), ValueError, "support_y"),
        ("query_y has fewer samples", replace(3, lambda b: b[3][:, :2]), ValueError, "query_y"),
        ("float labels", replace(1, lambda b: b[1].double()), TypeError, "support_y"),
        ("int32 labels", replace(3, lambda b: b[3].int()), TypeError, "query_y"),
        ("negative label", with_value(1, (1, 0), -1), ValueError, "support_y"),
        ("label == classes", with_value(3, (2, 1), 3), ValueError, "query_y"),
        ("label > classes", with_value(1, (0, 0), 11), ValueError, "support_y"),
        ("integer inputs", replace(0, lambda b: b[0].long()), TypeError, "support_x"),
        ("bool query inputs", replace(2, lambda b: b[2] > 0), TypeError, "query_x"),
        ("float32 inputs, float64 model", replace(0, lambda b: b[0].float()), TypeError,
         "support_x"),
        ("float32 query, float64 model", replace(2, lambda b: b[2].float()), TypeError,
         "query_x"),
        ("empty support set", replace(0, lambda b: b[0][:, :0]), ValueError, "support_x"),
        ("no tasks", replace(0, lambda b: b[0][:0]), ValueError, "support_x"),
        ("no query samples", replace(2, lambda b: b[2][:, :0]), ValueError, "query_x"),
        ("query sample shape differs", replace(2, lambda b: b[2][..., :3]), ValueError,
         "query_x"),
        ("missing task dim", replace(0, lambda b: b[0][0, 0]), ValueError, "support_x"),
        ("list instead of tensor", replace(0, lambda b: b[0].tolist()), TypeError, "support_x"),
        ("NaN in support_x task 2", with_value(0, (2, 1, 0), math.nan), FloatingPointError,
         r"support_x.*task 2"),
        ("inf in query_x task 1", with_value(2, (1, 0, 3), math.inf), FloatingPointError,
         r"query_x.*task 1"),
    ]


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", _bad_classification_batches(), ids=lambda c: c[0])
def test_bad_classification_batch_is_rejected(case, algorithm, backend, nothing_runs):
    _, modify, error, pattern = case
    model = _with_stale_grads(_classifier())
    algo = _make(algorithm, model, "cross_entropy", backend=backend)
    batch = modify(classification_batch(3, 5, 4, 4, 3))
    before = snapshot(algo)  # the model's parameters, and Meta-SGD's learning rates
    with pytest.raises(error, match=pattern):
        algo(*batch)
    assert_unchanged(algo, before)
    # adapt() validates the same way (support only).
    if pattern.startswith("support"):
        with pytest.raises(error, match=pattern):
            algo.adapt(batch[0], batch[1])
        assert_unchanged(algo, before)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bad_regression_batch_is_rejected(algorithm, backend, nothing_runs):
    model = _with_stale_grads(_regressor())
    algo = _make(algorithm, model, "mse", backend=backend)
    sx, sy, qx, qy = regression_batch(4, 5, 6, 2, 1)
    before = snapshot(algo)
    bad_qy = qy.clone()
    bad_qy[3, 2, 0] = math.nan
    cases = [
        ((sx, sy, qx, bad_qy), FloatingPointError, r"query_y.*task 3"),
        ((sx, sy.float(), qx, qy), TypeError, "support_y"),
        ((sx, sy.long(), qx, qy), TypeError, "support_y"),
        ((sx, sy, qx, qy[:, :3]), ValueError, "query_y"),
        ((sx, sy, qx, qy[1:]), ValueError, "query_y"),
        ((sx, sy, qx[1:], qy[1:]), ValueError, "query_x"),
    ]
    for batch, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            algo(*batch)
        assert_unchanged(algo, before)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_reptile_validates_its_support_set(backend, nothing_runs):
    model = _with_stale_grads(_classifier())
    reptile = fastmeta.Reptile(model, 0.1, inner_steps=2, loss="cross_entropy", backend=backend)
    sx, sy, _, _ = classification_batch(3, 5, 4, 4, 3)
    before = snapshot(model)
    bad_x = sx.clone()
    bad_x[1, 0, 0] = math.nan
    bad_y = sy.clone()
    bad_y[0, 0] = 3
    for args, error, pattern in [((bad_x, sy), FloatingPointError, r"support_x.*task 1"),
                                 ((sx, bad_y), ValueError, "support_y"),
                                 ((sx, sy.double()), TypeError, "support_y"),
                                 ((sx.float(), sy), TypeError, "support_x"),
                                 ((sx[:, :0], sy[:, :0]), ValueError, "support_x"),
                                 ((sx, sy[:2]), ValueError, "support_y")]:
        with pytest.raises(error, match=pattern):
            reptile(*args)
        assert_unchanged(model, before)


# --- NaN produced by the computation itself -------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_overflowing_inner_loop_raises_with_task_index(algorithm, backend):
    model = _with_stale_grads(_regressor())
    sx, sy, qx, qy = regression_batch(3, 5, 5, 2, 1)
    if algorithm == "reptile":
        algo = fastmeta.Reptile(model, 1e200, inner_steps=2, loss="mse", backend=backend)
        args = (sx, sy)
    else:
        algo = fastmeta.MAML(model, 1e200, inner_steps=2, first_order=algorithm == "fomaml",
                             loss="mse", backend=backend)
        args = (sx, sy, qx, qy)
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf|-inf) for task \d"):
        algo(*args)
    assert_unchanged(model, before)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_nan_in_query_loss_names_the_task(backend):
    model = fastmeta.models.mlp([2, 8, 1], "relu").double()
    maml = fastmeta.MAML(model, 0.01, loss="mse", backend=backend)
    sx, sy, qx, qy = regression_batch(3, 5, 5, 2, 1)
    qx = qx.clone()
    qx[2] *= 1e300  # finite inputs, but task 2's squared query error overflows
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match=r"query loss is inf for task 2"):
        maml(sx, sy, qx, qy)
    assert_unchanged(model, before)


# --- settings -------------------------------------------------------------------------------
BAD_LRS = [0, -0.1, math.nan, math.inf, -math.inf, "0.1", None, True]
BAD_STEPS = [0, -1, 1.5, "2", True, None]


@pytest.mark.parametrize("lr", BAD_LRS, ids=repr)
def test_bad_inner_lr(lr):
    model = _regressor()
    for make in (lambda: fastmeta.MAML(model, lr),
                 lambda: fastmeta.MetaSGD(model, lr),
                 lambda: fastmeta.ANIL(model, inner_lr=lr),
                 lambda: fastmeta.Reptile(model, lr)):
        with pytest.raises(ValueError, match="inner_lr"):
            make()


@pytest.mark.parametrize("steps", BAD_STEPS, ids=repr)
def test_bad_inner_steps(steps):
    model = _regressor()
    for make in (lambda: fastmeta.MAML(model, 0.1, inner_steps=steps),
                 lambda: fastmeta.MetaSGD(model, 0.1, inner_steps=steps),
                 lambda: fastmeta.ANIL(model, inner_lr=0.1, inner_steps=steps),
                 lambda: fastmeta.Reptile(model, 0.1, inner_steps=steps)):
        with pytest.raises(ValueError, match="inner_steps"):
            make()


def test_bad_adapt_steps():
    model = _regressor()
    sx, sy, _, _ = regression_batch(2, 5, 5, 2, 1)
    for algo in (fastmeta.MAML(model, 0.1, backend="torch"),
                 fastmeta.Reptile(model, 0.1, backend="torch")):
        for steps in (-1, 1.5, True, "3"):
            with pytest.raises(ValueError, match="steps"):
                algo.adapt(sx, sy, steps=steps)


@pytest.mark.parametrize("loss", ["l2", "MSE", "crossentropy", None, ""])
def test_bad_loss_name(loss):
    model = _regressor()
    for make in (lambda: fastmeta.MAML(model, 0.1, loss=loss),
                 lambda: fastmeta.MetaSGD(model, 0.1, loss=loss),
                 lambda: fastmeta.ANIL(model, inner_lr=0.1, loss=loss),
                 lambda: fastmeta.Reptile(model, 0.1, loss=loss)):
        with pytest.raises(ValueError, match="loss"):
            make()


@pytest.mark.parametrize("backend", ["gpu", "CPU", "", None, "mps"])
def test_bad_backend_name(backend):
    model = _regressor()
    for make in (lambda: fastmeta.MAML(model, 0.1, backend=backend),
                 lambda: fastmeta.MetaSGD(model, 0.1, backend=backend),
                 lambda: fastmeta.ANIL(model, inner_lr=0.1, backend=backend),
                 lambda: fastmeta.Reptile(model, 0.1, backend=backend)):
        with pytest.raises(ValueError, match="backend"):
            make()


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model"):
        fastmeta.MAML(lambda x: x, 0.1)
    with pytest.raises(TypeError, match="model"):
        fastmeta.Reptile([nn.Linear(1, 1)], 0.1)


def test_model_without_parameters_or_with_mixed_dtypes(nothing_runs):
    sx, sy, qx, qy = regression_batch(2, 3, 3, 2, 2)
    maml = fastmeta.MAML(nn.Sequential(nn.ReLU()), 0.1, backend="torch")
    with pytest.raises(ValueError, match="no parameters"):
        maml(sx, sy, qx, qy)
    mixed = nn.Sequential(nn.Linear(2, 2).double(), nn.Linear(2, 2).float())
    maml = fastmeta.MAML(mixed, 0.1, backend="torch")
    with pytest.raises(TypeError, match="parameter"):
        maml(sx, sy, qx, qy)


def test_anil_bad_head():
    model = _classifier()
    with pytest.raises(ValueError, match="nope"):
        fastmeta.ANIL(model, head="nope", inner_lr=0.1)
    with pytest.raises(ValueError, match="submodule"):
        fastmeta.ANIL(model, head=nn.Linear(8, 3), inner_lr=0.1)
    with pytest.raises(ValueError, match="no parameters"):
        fastmeta.ANIL(model, head="1", inner_lr=0.1)  # the ReLU
    with pytest.raises(ValueError, match="head"):
        fastmeta.ANIL(nn.Sequential(nn.Conv2d(1, 1, 3)), inner_lr=0.1)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_mse_target_width_mismatch_is_a_clear_error(backend):
    model = _regressor()  # one output
    maml = fastmeta.MAML(model, 0.1, backend=backend)
    sx, _, qx, _ = regression_batch(2, 4, 4, 2, 1)
    with pytest.raises(ValueError, match="targets"):
        maml(sx, torch.randn(2, 4, 3, dtype=torch.float64), qx,
             torch.randn(2, 4, 1, dtype=torch.float64))


# --- backends -------------------------------------------------------------------------------
def _all_algorithms(model, loss, backend):
    return [fastmeta.MAML(model, 0.1, loss=loss, backend=backend),
            fastmeta.MAML(model, 0.1, first_order=True, loss=loss, backend=backend),
            fastmeta.MetaSGD(model, 0.1, loss=loss, backend=backend),
            fastmeta.ANIL(model, inner_lr=0.1, loss=loss, backend=backend)]


def test_cuda_backend_on_cpu_build_says_why():
    model = _with_stale_grads(_classifier())
    batch = classification_batch(2, 5, 4, 4, 3)
    before = snapshot(model)
    for algo in _all_algorithms(model, "cross_entropy", "cuda"):
        with pytest.raises(ValueError, match=r"backend='cuda'.*(CUDA|cuda)"):
            algo(*batch)
        assert_unchanged(model, before)
    reptile = fastmeta.Reptile(model, 0.1, loss="cross_entropy", backend="cuda")
    with pytest.raises(ValueError, match=r"backend='cuda'"):
        reptile(*batch[:2])
    assert_unchanged(model, before)


class _NotSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = fastmeta.models.mlp([4, 8, 3], "relu").double()

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("model_kind", ["dropout", "not-sequential", "layernorm"])
def test_cpu_backend_refuses_unsupported_models(model_kind):
    """backend='cpu' (the compiled core) refuses what it cannot run, and says why."""
    if model_kind == "dropout":
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
        reason = "Dropout"
    elif model_kind == "layernorm":
        model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
        reason = "LayerNorm"
    else:
        model = _NotSequential()
        reason = "Sequential"
    model = _with_stale_grads(model.double())
    batch = classification_batch(2, 5, 4, 4, 3)
    before = snapshot(model)
    for algo in _all_algorithms(model, "cross_entropy", "cpu"):
        with pytest.raises(ValueError) as info:
            algo(*batch)
        message = str(info.value)
        assert "backend='cpu'" in message
        # Either the specific layer, or (before a compiled engine for this algorithm
        # exists) that there is none.
        assert reason in message or "engine" in message, message
        assert_unchanged(model, before)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_cpu_backend_on_supported_model_runs_exactly_or_refuses(algorithm):
    """Where the compiled core serves the call, it must agree with the reference engine;
    where it does not (yet), it must refuse with a ValueError that says so."""
    model = _classifier()
    batch = classification_batch(3, 5, 4, 4, 3)
    reference = _make(algorithm, model, "cross_entropy", inner_steps=2)
    loss = reference(*batch)
    loss.backward()
    expected = [p.grad.clone() for p in reference.parameters()]
    for p in reference.parameters():
        p.grad = None
    try:
        compiled = _make(algorithm, model, "cross_entropy", backend="cpu", inner_steps=2)
        value = compiled(*batch)
    except ValueError as error:
        assert "cpu" in str(error)
        return
    value.backward()
    torch.testing.assert_close(value, loss, rtol=1e-12, atol=0)
    for p, g in zip(compiled.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
