"""The public API: every documented name exists and does what it says."""
from __future__ import annotations

import math
import os
import uuid

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta import backends
from fastmeta.losses import per_task_loss
from conftest import classification_batch, regression_batch

CORE_DISABLED = os.environ.get("FASTMETA_DISABLE_CORE", "") not in ("", "0")


# --- names ----------------------------------------------------------------------------------
def test_public_names():
    for name in ("MAML", "MetaSGD", "ANIL", "Reptile", "AdaptedModel"):
        assert isinstance(getattr(fastmeta, name), type), name
    for name in fastmeta.__all__:
        assert hasattr(fastmeta, name), name
    assert issubclass(fastmeta.MetaSGD, fastmeta.MAML) and issubclass(fastmeta.ANIL, fastmeta.MAML)
    for cls in (fastmeta.MAML, fastmeta.MetaSGD, fastmeta.ANIL, fastmeta.Reptile):
        assert issubclass(cls, nn.Module)
    assert callable(fastmeta.models.mlp) and callable(fastmeta.models.conv4)
    assert isinstance(fastmeta.data.Sinusoid, type)
    assert callable(fastmeta.backends.info) and callable(fastmeta.backends.resolve)
    assert isinstance(fastmeta.__version__, str) and fastmeta.__version__.count(".") >= 1


# --- backends -------------------------------------------------------------------------------
def test_backends_info():
    info = backends.info()
    assert info["torch"] == torch.__version__
    assert isinstance(info["in_use"], str) and info["in_use"]
    if CORE_DISABLED:
        assert info["core_available"] is False and "FASTMETA_DISABLE_CORE" in info["core_error"]
        return
    assert info["core_available"] is True
    assert "reptile_direction" in info["kernels"]
    assert "build_info" not in info["kernels"]
    assert info["version"] == fastmeta.__version__
    assert isinstance(info["openmp"], bool) and info["max_threads"] >= 1
    assert info["cuda"] is False  # this is a CPU build


def test_backends_resolve():
    cpu = torch.device("cpu")
    assert backends.resolve("torch", cpu, "anything") == "torch"
    assert backends.resolve("torch", cpu, None) == "torch"
    with pytest.raises(ValueError, match="cuda"):
        backends.resolve("cuda", cpu, None)
    reason = f"a unique reason {uuid.uuid4()}"  # warnings are once per distinct reason
    with pytest.raises(ValueError, match=reason):
        backends.resolve("cpu", cpu, reason)
    with pytest.warns(RuntimeWarning, match=reason):
        assert backends.resolve("auto", cpu, reason) == "torch"
    if CORE_DISABLED:
        assert backends.resolve("auto", cpu, None) == "torch"
        with pytest.raises(ValueError, match="unavailable"):
            backends.resolve("cpu", cpu, None)
    else:
        assert backends.resolve("auto", cpu, None) == "cpu"
        assert backends.resolve("cpu", cpu, None) == "cpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.check_backend_name("gpu")



def test_parameter_list_is_module_parameters():
    from fastmeta.functional import parameter_list

    shared = nn.Linear(3, 4)
    model = nn.Sequential(nn.Linear(2, 3, bias=False), nn.Sequential(shared, nn.ReLU(), shared),
                          nn.Linear(4, 1))
    model.register_parameter("scale", nn.Parameter(torch.ones(1)))
    model[1].register_parameter("unused", None)
    assert [id(p) for p in parameter_list(model)] == [id(p) for p in model.parameters()]


@pytest.mark.skipif(CORE_DISABLED, reason="needs the compiled core")
def test_engine_choice_follows_backend_dtype_and_loss_changes():
    """MAML remembers a "cpu" choice per kind of input (MAML._resolve); a change of
    backend, dtype or inputs must choose again."""
    torch.manual_seed(0)
    maml = fastmeta.MAML(fastmeta.models.mlp([1, 8, 1]), 0.1, backend="auto")
    batch = regression_batch(3, 4, 4, 1, 1, dtype=torch.float32)
    maml(*batch)
    assert maml.last_backend == "cpu"
    maml.backend = "torch"
    maml(*batch)
    assert maml.last_backend == "torch"
    maml.backend = "auto"
    maml(*batch)
    assert maml.last_backend == "cpu"
    maml.model.double()
    maml(*(t.double() for t in batch))
    assert maml.last_backend == "cpu"
    with pytest.raises(TypeError, match="float32"):  # the check still runs on a remembered choice
        maml(*batch)


# --- AdaptedModel ---------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd", "anil", "reptile"])
def test_adapted_model_shapes(algorithm):
    model = fastmeta.models.mlp([3, 10, 4], "tanh")
    kwargs = dict(loss="cross_entropy", inner_steps=2)
    algo = {"maml": lambda: fastmeta.MAML(model, 0.1, **kwargs),
            "fomaml": lambda: fastmeta.MAML(model, 0.1, first_order=True, **kwargs),
            "metasgd": lambda: fastmeta.MetaSGD(model, 0.1, **kwargs),
            "anil": lambda: fastmeta.ANIL(model, inner_lr=0.1, **kwargs),
            "reptile": lambda: fastmeta.Reptile(model, 0.1, **kwargs)}[algorithm]()
    sx, sy, qx, _ = classification_batch(5, 6, 7, 3, 4, dtype=torch.float32)
    adapted = algo.adapt(sx, sy)
    assert isinstance(adapted, fastmeta.AdaptedModel)
    assert adapted.num_tasks == 5
    out = adapted(qx)
    assert out.shape == (5, 7, 4) and out.dtype == torch.float32
    weights = adapted.named_fast_weights()
    assert list(weights) == [name for name, _ in model.named_parameters()]
    for (name, p), w in zip(model.named_parameters(), weights.values()):
        assert w.shape == (5, *p.shape), name
    assert len(adapted.support_losses) == 2
    assert all(l.shape == (5,) and not l.requires_grad for l in adapted.support_losses)
    with pytest.raises(ValueError, match="5 tasks"):
        adapted(qx[:3])
    # Task t's predictions are its own model's: running task 1's weights alone agrees.
    single = {name: w[1] for name, w in weights.items()}
    torch.testing.assert_close(torch.func.functional_call(model, single, (qx[1],)), out[1])


def test_adapt_under_no_grad_has_no_graph_and_same_values():
    model = fastmeta.models.mlp([3, 10, 4], "relu").double()
    maml = fastmeta.MAML(model, 0.3, inner_steps=3, loss="cross_entropy")
    sx, sy, qx, _ = classification_batch(4, 6, 5, 3, 4)
    with torch.no_grad():
        adapted = maml.adapt(sx, sy)
        out = adapted(qx)
    assert all(not w.requires_grad and w.grad_fn is None for w in adapted.fast_weights)
    assert not out.requires_grad
    with_graph = maml.adapt(sx, sy)
    assert all(w.requires_grad and w.grad_fn is not None for w in with_graph.fast_weights)
    for a, b, p in zip(adapted.fast_weights, with_graph.fast_weights, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-13, atol=1e-15)
        assert not torch.equal(a, p.detach().expand_as(a))  # adaptation moved the weights
    # The loss under no_grad equals the loss with grad enabled.
    batch = classification_batch(4, 6, 5, 3, 4)
    with torch.no_grad():
        quiet = maml(*batch)
    assert not quiet.requires_grad
    torch.testing.assert_close(quiet, maml(*batch).detach(), rtol=1e-13, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_adapt_steps_override_and_zero_steps():
    model = fastmeta.models.mlp([2, 8, 1], "tanh").double()
    maml = fastmeta.MAML(model, 0.1, inner_steps=1)
    sx, sy, _, _ = regression_batch(3, 5, 5, 2, 1)
    zero = maml.adapt(sx, sy, steps=0)
    for w, p in zip(zero.fast_weights, model.parameters()):
        assert torch.equal(w.detach(), p.detach().expand_as(w))
    three = maml.adapt(sx, sy, steps=3)
    assert len(three.support_losses) == 3
    # Plain SGD on a smooth regression problem with a small step lowers the support loss.
    assert bool((three.support_losses[2] < three.support_losses[0]).all())


def test_adapted_model_gives_the_meta_gradient():
    """loss over adapted(query_x), differentiated, is exactly MAML's meta-gradient."""
    model = fastmeta.models.mlp([2, 8, 8, 1], "tanh").double()
    maml = fastmeta.MAML(model, 0.1, inner_steps=2, backend="torch")
    sx, sy, qx, qy = regression_batch(3, 5, 5, 2, 1)
    maml(sx, sy, qx, qy).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    adapted = maml.adapt(sx, sy)
    per_task_loss("mse", adapted(qx), qy).mean().backward()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)


# --- training steps -------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd", "anil", "reptile"])
def test_optimizer_step_changes_the_parameters(algorithm):
    model = fastmeta.models.mlp([2, 16, 16, 1], "relu")
    if algorithm == "maml":
        algo = fastmeta.MAML(model, 0.05, inner_steps=2)
    elif algorithm == "fomaml":
        algo = fastmeta.MAML(model, 0.05, inner_steps=2, first_order=True)
    elif algorithm == "metasgd":
        algo = fastmeta.MetaSGD(model, 0.05, inner_steps=2)
    elif algorithm == "anil":
        algo = fastmeta.ANIL(model, inner_lr=0.05, inner_steps=2)
    else:
        algo = fastmeta.Reptile(model, 0.05, inner_steps=2)
    optimizer = torch.optim.SGD(algo.parameters(), lr=0.01)
    sx, sy, qx, qy = regression_batch(4, 5, 5, 2, 1, dtype=torch.float32)
    before = [p.detach().clone() for p in algo.parameters()]
    optimizer.zero_grad()
    loss = algo(sx, sy) if algorithm == "reptile" else algo(sx, sy, qx, qy)
    assert loss.shape == () and math.isfinite(float(loss.detach()))
    loss.backward()
    for p in algo.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    optimizer.step()
    changed = [not torch.equal(p.detach(), b) for p, b in zip(algo.parameters(), before)]
    assert all(changed), changed  # every tensor moved: ANIL's body and Meta-SGD's rates too


def test_meta_sgd_parameters_include_the_learning_rates():
    model = fastmeta.models.mlp([2, 6, 1])
    msgd = fastmeta.MetaSGD(model, 0.03)
    params = list(msgd.parameters())
    model_params = list(model.parameters())
    assert len(params) == 2 * len(model_params)
    ids = set(map(id, params))
    assert set(map(id, model_params)) <= ids
    assert set(map(id, msgd.inner_lrs)) <= ids
    assert isinstance(msgd.inner_lrs, nn.ParameterList)
    for rate, p in zip(msgd.inner_lrs, model_params):
        assert rate.shape == p.shape and rate.dtype == p.dtype and rate.requires_grad
        assert torch.equal(rate.detach(), torch.full_like(p, 0.03))
    names = [name for name, _ in msgd.named_parameters()]
    assert any(name.startswith("inner_lrs.") for name in names)
    # MAML's own parameters are just the model's.
    assert set(map(id, fastmeta.MAML(model, 0.1).parameters())) == set(map(id, model_params))


def test_reptile_loss_is_mean_support_loss_at_theta():
    model = fastmeta.models.mlp([2, 8, 1], "tanh").double()
    reptile = fastmeta.Reptile(model, 0.1, inner_steps=3)
    sx, sy, _, _ = regression_batch(3, 5, 5, 2, 1)
    value = reptile(sx, sy)
    expected = torch.stack([F.mse_loss(model(sx[t]), sy[t]) for t in range(3)]).mean()
    torch.testing.assert_close(value.detach(), expected.detach(), rtol=1e-13, atol=0)


def test_maml_learns_sinusoids():
    """A short meta-training run improves post-adaptation loss on held-out tasks."""
    torch.manual_seed(0)
    model = fastmeta.models.mlp([1, 32, 32, 1], "relu")
    maml = fastmeta.MAML(model, 0.01, inner_steps=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    tasks = fastmeta.data.Sinusoid(k_shot=10, q_query=10, seed=1)
    held_out = fastmeta.data.Sinusoid(k_shot=10, q_query=10, seed=2).sample(50)

    def evaluate():
        adapted = maml.adapt(held_out.support_x, held_out.support_y)
        with torch.no_grad():
            return float(per_task_loss("mse", adapted(held_out.query_x), held_out.query_y).mean())

    before = evaluate()
    for _ in range(150):
        batch = tasks.sample(8)
        optimizer.zero_grad()
        maml(batch.support_x, batch.support_y, batch.query_x, batch.query_y).backward()
        optimizer.step()
    assert evaluate() < 0.7 * before


# --- data -----------------------------------------------------------------------------------
def test_sinusoid_shapes_ranges_and_formula():
    tasks = fastmeta.data.Sinusoid(k_shot=5, q_query=7, seed=3)
    batch = tasks.sample(200)
    assert batch.support_x.shape == batch.support_y.shape == (200, 5, 1)
    assert batch.query_x.shape == batch.query_y.shape == (200, 7, 1)
    assert batch.amplitude.shape == batch.phase.shape == (200,)
    assert all(t.dtype == torch.float32 for t in batch)
    assert 0.1 <= float(batch.amplitude.min()) and float(batch.amplitude.max()) <= 5.0
    assert 0.0 <= float(batch.phase.min()) and float(batch.phase.max()) <= math.pi
    for x in (batch.support_x, batch.query_x):
        assert -5.0 <= float(x.min()) and float(x.max()) <= 5.0
    # The draws cover their ranges (not, say, stuck at one value).
    assert float(batch.amplitude.max() - batch.amplitude.min()) > 4.0
    assert float(batch.query_x.max() - batch.query_x.min()) > 9.0
    amplitude, phase = batch.amplitude[:, None, None], batch.phase[:, None, None]
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        torch.testing.assert_close(y, amplitude * torch.sin(x - phase), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fastmeta.data.Sinusoid.curve(amplitude, phase, x), y,
                                   rtol=1e-5, atol=1e-5)
    other = tasks.sample(3, k_shot=2, q_query=4)
    assert other.support_x.shape == (3, 2, 1) and other.query_x.shape == (3, 4, 1)
    doubles = fastmeta.data.Sinusoid(seed=0, dtype=torch.float64).sample(2)
    assert all(t.dtype == torch.float64 for t in doubles)


def test_sinusoid_is_reproducible_and_resumable():
    a, b = fastmeta.data.Sinusoid(seed=11), fastmeta.data.Sinusoid(seed=11)
    for _ in range(3):
        for x, y in zip(a.sample(4), b.sample(4)):
            assert torch.equal(x, y)
    c = fastmeta.data.Sinusoid(seed=12)
    assert not torch.equal(a.sample(4).support_x, c.sample(4).support_x)
    # Consecutive batches differ; state()/load_state() replays the stream exactly.
    state = a.state()
    first, second = a.sample(4), a.sample(4)
    assert not torch.equal(first.support_x, second.support_x)
    a.load_state(state)
    for x, y in zip(first, a.sample(4)):
        assert torch.equal(x, y)
    # The global RNG plays no part.
    torch.manual_seed(0)
    d = fastmeta.data.Sinusoid(seed=11).sample(4)
    torch.manual_seed(1)
    e = fastmeta.data.Sinusoid(seed=11).sample(4)
    assert torch.equal(d.query_y, e.query_y)


@pytest.mark.parametrize("kwargs", [dict(k_shot=0), dict(q_query=-1), dict(k_shot=2.5),
                                    dict(k_shot=True)])
def test_sinusoid_validates(kwargs):
    with pytest.raises(ValueError):
        fastmeta.data.Sinusoid(**kwargs)


def test_sinusoid_sample_validates():
    tasks = fastmeta.data.Sinusoid()
    for bad in (0, -2, 1.0, True):
        with pytest.raises(ValueError, match="meta_batch"):
            tasks.sample(bad)


# --- models ---------------------------------------------------------------------------------
def test_mlp_structure():
    model = fastmeta.models.mlp([1, 40, 40, 1])
    assert isinstance(model, nn.Sequential)
    kinds = [type(m) for m in model]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [40, 40, 1]
    assert type(fastmeta.models.mlp([2, 3, 4], "tanh")[1]) is nn.Tanh
    assert type(fastmeta.models.mlp([2, 3, 4], "sigmoid")[1]) is nn.Sigmoid
    assert len(fastmeta.models.mlp([2, 4])) == 1  # a single linear layer
    assert fastmeta.models.mlp([3, 5, 2])(torch.randn(7, 3)).shape == (7, 2)


@pytest.mark.parametrize("sizes", [[1], [], [1, 0, 1], [1, -4], [2, 3.0], [2, "3"], [2, None]])
def test_mlp_validates_sizes(sizes):
    with pytest.raises(ValueError, match="sizes"):
        fastmeta.models.mlp(sizes)


@pytest.mark.parametrize("activation", ["gelu", "ReLU", None, ""])
def test_mlp_validates_activation(activation):
    with pytest.raises(ValueError, match="activation"):
        fastmeta.models.mlp([2, 3, 1], activation)


@pytest.mark.parametrize("image_size,hidden,final", [(28, 8, 1), (84, 4, 5), (16, 4, 1)])
def test_conv4_shapes(image_size, hidden, final):
    model = fastmeta.models.conv4(in_channels=3, n_way=5, hidden=hidden, image_size=image_size)
    assert isinstance(model, nn.Sequential)
    assert model[-1].in_features == hidden * final * final
    out = model(torch.randn(2, 3, image_size, image_size))
    assert out.shape == (2, 5)
    norms = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 4 and all(not m.track_running_stats for m in norms)
    assert sum(isinstance(m, nn.Conv2d) for m in model) == 4
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 4


def test_conv4_through_maml():
    model = fastmeta.models.conv4(in_channels=1, n_way=5, hidden=4, image_size=28)
    maml = fastmeta.MAML(model, 0.4, loss="cross_entropy")
    sx, sy, qx, qy = classification_batch(2, 5, 3, (1, 28, 28), 5, dtype=torch.float32)
    assert maml.adapt(sx, sy)(qx).shape == (2, 3, 5)
    loss = maml(sx, sy, qx, qy)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # Batch norm uses each batch's own statistics: the model keeps no running state.
    assert not any(True for _ in model.buffers())


@pytest.mark.parametrize("kwargs", [dict(in_channels=0), dict(n_way=0), dict(hidden=-1),
                                    dict(image_size=8), dict(image_size=28.0), dict(n_way="5")])
def test_conv4_validates(kwargs):
    with pytest.raises(ValueError, match="conv4"):
        fastmeta.models.conv4(**kwargs)
