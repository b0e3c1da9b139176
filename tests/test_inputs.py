"""Bad input is rejected with a clear error that names the argument, before anything runs,
and leaves the model's parameters and gradients exactly as they were."""
from __future__ import annotations

import copy
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


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bad_input_to_an_adapted_model_is_rejected(algorithm):
    algo = _make(algorithm, _classifier(), "cross_entropy")
    sx, sy, qx, _ = classification_batch(3, 5, 4, 4, 3)
    adapted = algo.adapt(sx, sy)
    for bad, error, match in (("x", TypeError, "torch.Tensor"),
                              (qx.float(), TypeError, "float32 but the model"),
                              (qx.long(), TypeError, "floating-point"),
                              (qx[..., :3], ValueError, r"like the support set"),
                              (qx[:2], ValueError, "holds 3 tasks"),
                              (qx[:, :0], ValueError, "empty")):
        with pytest.raises(error, match=match):
            adapted(bad)
    assert adapted(qx).shape == (3, qx.shape[1], 3)


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


# --------------------------------------------------------------------------------------------
# The compiled engines against odd and bad input (cases a fuzzing pass found)
# --------------------------------------------------------------------------------------------
def _conv_net():
    return fastmeta.models.conv4(in_channels=1, n_way=3, hidden=4, image_size=16).double()


def _conv_batch():
    return classification_batch(2, 5, 4, (1, 16, 16), 3)


def _learner(kind, model, loss, backend):
    if kind == "reptile":
        return fastmeta.Reptile(model, 0.1, 2, loss=loss, backend=backend)
    return _make(kind, model, loss, backend=backend)


def _call(learner, batch):
    return learner(*batch[:2]) if isinstance(learner, fastmeta.Reptile) else learner(*batch)


@pytest.mark.parametrize("network", ["mlp", "conv"])
@pytest.mark.parametrize("kind", ["maml", "fomaml", "metasgd", "reptile"])
def test_nan_in_a_parameter_raises_as_on_the_reference_engine(network, kind):
    """A ReLU (or max-pool) must let a NaN through, as torch's do: a NaN weight gives a NaN
    loss, never a finite one from a partly NaN network."""
    for backend in ("torch", "cpu"):
        model = _classifier() if network == "mlp" else _conv_net()
        batch = classification_batch(3, 5, 4, 4, 3) if network == "mlp" else _conv_batch()
        learner = _learner(kind, model, "cross_entropy", backend)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = math.nan
        with pytest.raises(FloatingPointError, match="support loss is nan for task 0"):
            _call(learner, batch)


def test_nan_in_a_meta_sgd_rate_raises_as_on_the_reference_engine():
    for backend in ("torch", "cpu"):
        learner = fastmeta.MetaSGD(_classifier(), 0.1, loss="cross_entropy", backend=backend)
        with torch.no_grad():
            learner.inner_lrs[0].view(-1)[3] = math.nan
        with pytest.raises(FloatingPointError, match="query loss is nan for task 0"):
            learner(*classification_batch(3, 5, 4, 4, 3))


@pytest.mark.parametrize("replace", ["transposed weight", "expanded bias"])
def test_a_parameter_relaid_at_the_same_address_is_read_anew(replace):
    """The compiled engine's cached views of the parameters must not outlive their layout."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    batch = classification_batch(3, 5, 4, 4, 3)
    compiled = fastmeta.MAML(model, 0.1, loss="cross_entropy", backend="cpu")
    compiled(*batch)
    if replace == "transposed weight":
        model[0].weight.data = model[0].weight.data.t()
    else:
        model[0].bias.data = model[0].bias.data[:1].expand(4)
    reference = fastmeta.MAML(model, 0.1, loss="cross_entropy", backend="torch")
    torch.testing.assert_close(compiled(*batch), reference(*batch), rtol=1e-12, atol=0)


def test_batch_norm_eps_changed_after_the_first_call_is_used():
    model = _conv_net()
    batch = _conv_batch()
    compiled = fastmeta.MAML(model, 0.1, loss="cross_entropy", backend="cpu")
    compiled(*batch)
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.eps = 0.5
    reference = fastmeta.MAML(model, 0.1, loss="cross_entropy", backend="torch")
    torch.testing.assert_close(compiled(*batch), reference(*batch), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind", ["maml", "metasgd", "anil", "reptile"])
def test_a_model_changed_after_the_learner_was_built_is_refused(kind, backend):
    """Both engines read the model's layers when the learner is built."""
    model = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    batch = classification_batch(3, 5, 4, 4, 3)
    learner = _learner(kind, model, "cross_entropy", backend)
    model[2] = nn.Linear(7, 3, bias=False).double()
    before = snapshot(model)
    with pytest.raises(ValueError, match="changed since the learner was built"):
        _call(learner, batch)
    assert_unchanged(model, before)


def _small_conv():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3)).double()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind", ["maml", "reptile"])
@pytest.mark.parametrize("change, match", [
    (lambda m: m.__setitem__(2, nn.Tanh()), r"layer 2 is a new Tanh \(was a ReLU\)"),
    (lambda m: setattr(m[3], "kernel_size", 3), r"layer 3 \(MaxPool2d\) changed its kernel_size"),
    (lambda m: setattr(m[0], "dilation", (2, 2)), r"layer 0 \(Conv2d\) changed its dilation"),
])
def test_a_layer_or_setting_changed_after_the_first_call_is_refused(kind, backend, change, match):
    """Both engines would go on running the layers they read: a change is an error."""
    model = _small_conv()
    batch = classification_batch(2, 3, 4, (1, 8, 8), 3)
    learner = _learner(kind, model, "cross_entropy", backend)
    _call(learner, batch)
    change(model)
    with pytest.raises(ValueError, match=match):
        _call(learner, batch)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_layer_changed_inside_a_nested_sequential_is_refused(backend):
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 7), nn.ReLU()), nn.Linear(7, 3)).double()
    batch = classification_batch(3, 5, 4, 4, 3)
    learner = _learner("maml", model, "cross_entropy", backend)
    _call(learner, batch)
    model[0][1] = nn.Tanh()
    with pytest.raises(ValueError, match=r"layer 1 is a new Tanh \(was a ReLU\)"):
        _call(learner, batch)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("sample, match", [
    ((3, 8, 8), r"\[3, 8, 8\] do not fit layer 0 \(Conv2d\), which takes \[1, height, width\]"),
    ((1, 6, 6), r"layer 5 \(Linear\), which takes 64 features; they reach it as \[36\]"),
    ((1, 1, 1), r"layer 3 \(MaxPool2d\), which takes images larger than 1x1"),
    ((64,), r"layer 0 \(Conv2d\)"),
])
def test_samples_that_do_not_fit_the_model_are_named(sample, match, backend):
    learner = _learner("maml", _small_conv(), "cross_entropy", backend)
    batch = classification_batch(2, 3, 4, sample, 3)
    with pytest.raises(ValueError, match="support_x: samples of shape .*" + match):
        _call(learner, batch)


def test_negated_views_are_read_as_their_values():
    """numpy() refuses a tensor with the negative bit; the engine resolves it first."""
    sx, sy, qx, qy = regression_batch(3, 5, 4, 2, 1)
    negated = torch.complex(0 * sx, -sx).conj().imag  # == sx, lazily negated
    assert negated.is_neg() and torch.equal(negated, sx)
    model = _regressor()
    values = [fastmeta.MAML(copy.deepcopy(model), 0.1, backend=backend)(negated, sy, qx, qy)
              for backend in ("torch", "cpu")]
    torch.testing.assert_close(values[1], values[0], rtol=1e-12, atol=0)


def test_reptile_cpu_backend_refuses_a_model_it_cannot_run():
    model = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(), nn.Linear(8, 3)).double()
    with pytest.raises(ValueError, match="backend='cpu' cannot serve this call.*LeakyReLU"):
        fastmeta.Reptile(model, 0.1, loss="cross_entropy", backend="cpu")(
            *classification_batch(3, 5, 4, 4, 3)[:2])


def test_inputs_that_require_grad_get_their_gradient_from_the_reference_engine():
    sx, sy, qx, qy = regression_batch(3, 5, 4, 2, 1)
    sx.requires_grad_()
    with pytest.raises(ValueError, match="require grad"):
        fastmeta.MAML(_regressor(), 0.1, backend="cpu")(sx, sy, qx, qy)
    grads, model = [], _regressor()
    for backend in ("torch", "auto"):
        learner = fastmeta.MAML(copy.deepcopy(model), 0.1, backend=backend)
        learner(sx, sy, qx, qy).backward()
        assert learner.last_backend == "torch"
        grads.append(sx.grad.clone())
        sx.grad = None
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("make, error, pattern", [
    (lambda b: (b[0].to_sparse(), *b[1:]), TypeError, "support_x must be a dense"),
    (lambda b: (b[0], b[1].to_sparse(), *b[2:]), TypeError, "support_y must be a dense"),
    (lambda b: (b[0].to("meta"), *b[1:]), ValueError, "support_x is on the meta device"),
    (lambda b: (b[0], b[1], None, b[3]), ValueError, "query_x and query_y are required"),
], ids=["sparse inputs", "sparse labels", "meta inputs", "no query_x"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_unusual_tensors_are_refused_clearly(make, error, pattern, backend, nothing_runs):
    model = _classifier()
    before = snapshot(model)
    with pytest.raises(error, match=pattern):
        fastmeta.MAML(model, 0.1, loss="cross_entropy", backend=backend)(
            *make(classification_batch(3, 5, 4, 4, 3)))
    assert_unchanged(model, before)


def test_labels_are_checked_against_a_model_that_ends_in_an_activation(nothing_runs):
    model = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3), nn.Sigmoid()).double()
    sx, sy, qx, qy = classification_batch(3, 5, 4, 4, 3)
    qy[1, 2] = 3
    with pytest.raises(ValueError, match=r"query_y holds labels in \[0, 3\].*< 3"):
        fastmeta.MAML(model, 0.1, loss="cross_entropy", backend="auto")(sx, sy, qx, qy)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_meta_sgd_rates_must_follow_the_model(backend):
    learner = fastmeta.MetaSGD(_classifier(torch.float32), 0.1, loss="cross_entropy",
                               backend=backend)
    learner.model.double()  # the model only, not the rates
    batch = classification_batch(3, 5, 4, 4, 3)
    with pytest.raises(TypeError, match="convert the learner"):
        learner(*batch)
    with pytest.raises(TypeError, match="convert the learner"):
        learner.adapt(*batch[:2])
    learner.double()
    learner(*batch)
    with pytest.raises(ValueError, match="inner_lr_init=1e\\+300 does not fit"):
        fastmeta.MetaSGD(_classifier(torch.float32), 1e300)


def test_conv_engine_checks_mse_targets_before_it_runs():
    model = _conv_net()
    sx, _, qx, _ = _conv_batch()
    sy, qy = torch.randn(2, 5, 2, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"targets have shape \(2, 5, 2\) but the model's output"):
        fastmeta.MAML(model, 0.1, loss="mse", backend="cpu")(sx, sy, qx, qy)


@pytest.mark.parametrize("model, words", [
    (lambda: nn.Sequential(nn.Linear(0, 3)), "Linear layer of zero width"),
    (lambda: fastmeta.models.conv4(1, 3, 4, 16), "eps=0.0"),
], ids=["zero-width Linear", "batch norm eps 0"])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_compiled_engines_name_degenerate_layers(model, words):
    model = model().double()
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.eps = 0.0
    with pytest.raises(ValueError, match=words):
        fastmeta.MAML(model, 0.1, loss="cross_entropy", backend="cpu")(
            *classification_batch(2, 3, 2, (0,) if "Linear" in words else (1, 16, 16), 3))


def test_conv_engine_reports_an_overflowed_batch_norm_instead_of_a_finite_loss():
    """Inputs of 1e300 overflow the batch-norm variance; normalising by an infinite scale
    would give zeros and a finite loss computed from nothing."""
    sx, sy, qx, qy = _conv_batch()
    learner = fastmeta.MAML(_conv_net(), 0.1, loss="cross_entropy", backend="cpu")
    with pytest.raises(FloatingPointError, match="support loss is nan for task 0"):
        learner(sx * 1e300, sy, qx, qy)
