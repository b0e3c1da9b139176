"""The compiled MLP engine (fastmeta._core.MlpEngine, fastmeta/engine_cpu.py) against the
torch reference engine (backend="torch").

On fresh random inputs, for every algorithm (second- and first-order MAML, Meta-SGD, ANIL,
Reptile), both losses, every activation and ragged widths (3-7-13-11-2: no width is a
multiple of a vector), the losses, adapted weights and meta-gradients (and Meta-SGD's rate
gradients) agree to a relative error (norm-wise) below 1e-10 in float64 and 1e-5 in
float32. The result is bitwise the same with one or two OpenMP threads, and
backend="auto" picks the engine for an MLP on the CPU.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import fastmeta
from fastmeta import backends
from fastmeta.engine_cpu import CompiledMLP, MlpSpec, mlp_spec
from conftest import classification_batch, regression_batch

pytestmark = pytest.mark.skipif(backends._core is None, reason="the compiled core is not built")

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
ALGORITHMS = ["maml", "maml-first-order", "metasgd", "metasgd-first-order", "anil",
              "anil-first-order"]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of a against the reference b."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def mixed_mlp(widths=(3, 7, 13, 11, 2), output_activation: bool = False,
              bias: bool = True) -> nn.Sequential:
    """Every activation once (tanh, sigmoid, relu), nested Sequentials, ragged widths."""
    acts = [nn.Tanh, nn.Sigmoid, nn.ReLU]
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias or i % 2 == 1))
        if i < len(widths) - 2:
            layers.append(acts[i % 3]())
    if output_activation:
        layers.append(nn.Tanh())
    return nn.Sequential(nn.Sequential(*layers[:3]), *layers[3:])


def make_algorithm(name: str, model: nn.Module, loss: str, steps: int, backend: str):
    first_order = name.endswith("first-order")
    lr = 0.3 if loss == "cross_entropy" else 0.05
    if name.startswith("maml"):
        return fastmeta.MAML(model, lr, steps, first_order=first_order, loss=loss, backend=backend)
    if name.startswith("metasgd"):
        alg = fastmeta.MetaSGD(model, lr, steps, first_order=first_order, loss=loss,
                               backend=backend)
        with torch.no_grad():  # different rates per weight, so the rate gradient is tested
            for rate in alg.inner_lrs:
                rate.mul_(torch.rand_like(rate) + 0.5)
        return alg
    return fastmeta.ANIL(model, inner_lr=lr, inner_steps=steps, first_order=first_order,
                         loss=loss, backend=backend)


def batch(loss: str, num_tasks: int, in_features: int, out_features: int, dtype,
          support: int = 6, query: int = 9):
    if loss == "mse":
        return regression_batch(num_tasks, support, query, in_features, out_features, dtype)
    return classification_batch(num_tasks, support, query, in_features, out_features, dtype)


def run_both(name, model, loss, steps, data):
    """Loss and .grad of every trained parameter, for the engine ("cpu") and the reference."""
    results = {}
    for backend in ("cpu", "torch"):
        torch.manual_seed(0)  # Meta-SGD's random rates: the same for both engines
        alg = make_algorithm(name, copy.deepcopy(model), loss, steps, backend)
        value = alg(*data)
        value.backward()
        assert alg.last_backend == backend
        results[backend] = (value.detach(), [p.grad.clone() for p in alg.parameters()])
    return results


# --------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------
def test_mlp_spec_of_supported_models():
    spec = mlp_spec(fastmeta.models.mlp([1, 40, 40, 1], "tanh"))
    assert spec == MlpSpec((1, 40, 40, 1), ("tanh", "tanh", "identity"), (True,) * 3, False)
    spec = mlp_spec(mixed_mlp(output_activation=True, bias=False))
    assert spec.widths == (3, 7, 13, 11, 2)
    assert spec.activations == ("tanh", "sigmoid", "relu", "tanh")
    assert spec.has_bias == (False, True, False, True)
    spec = mlp_spec(nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Identity(), nn.ReLU(),
                                  nn.Linear(4, 3)))
    assert spec.flattens_input and spec.widths == (16, 4, 3)


@pytest.mark.parametrize("model, words", [
    (nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(), nn.Linear(4, 2)), "LeakyReLU"),
    (fastmeta.models.conv4(hidden=4, image_size=16), "Conv2d"),
    (nn.Sequential(nn.ReLU(), nn.Linear(3, 2)), "before the first Linear"),
    (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Tanh(), nn.Linear(4, 2)), "two activations"),
    (nn.Linear(3, 2), "not an nn.Sequential"),
    (nn.Sequential(nn.Flatten(0), nn.Linear(3, 2)), "Flatten"),
])
def test_mlp_spec_names_what_it_cannot_run(model, words):
    reason = mlp_spec(model)
    assert isinstance(reason, str) and words in reason


# --------------------------------------------------------------------------------------------
# Engine vs reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tasks, steps", [(1, 1), (3, 5), (25, 1)])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_meta_gradient_matches_reference(name, loss, tasks, steps, dtype):
    model = mixed_mlp(output_activation=tasks == 3, bias=tasks != 1).to(dtype)
    data = batch(loss, tasks, 3, 2, dtype)
    results = run_both(name, model, loss, steps, data)
    (value, grads), (ref_value, ref_grads) = results["cpu"], results["torch"]
    assert value.dtype == dtype and value.shape == ()
    assert rel_error(value, ref_value) < RTOL[dtype]
    for g, ref in zip(grads, ref_grads):  # theta's gradient, then Meta-SGD's rates'
        assert g.dtype == dtype and g.shape == ref.shape
        assert rel_error(g, ref) < RTOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("name", ["maml", "metasgd", "anil"])
def test_losses_and_adapted_weights_match_reference(name, loss, dtype):
    model = mixed_mlp().to(dtype)
    sx, sy, qx, qy = batch(loss, 4, 3, 2, dtype)
    alg = make_algorithm(name, model, loss, 3, "torch")
    adapted = alg.adapt(sx, sy)
    params = list(model.parameters())
    lrs = alg._inner_lrs()
    engine = CompiledMLP(model, loss, alg._adapted())
    result = engine.run(params, lrs if name == "metasgd" else alg.inner_lr, 3, "second_order",
                        sx, sy, qx, qy, want_adapted=True)
    ref_adapted = torch.cat([w.detach().reshape(4, -1) for w in adapted.fast_weights], 1)
    assert rel_error(result.adapted, ref_adapted) < RTOL[dtype]
    ref_support = torch.stack(adapted.support_losses, 1)
    assert rel_error(result.support_losses, ref_support) < RTOL[dtype]
    output = adapted(qx).detach()
    ref_query = fastmeta.losses.per_task_loss(loss, output, qy)
    assert rel_error(result.query_losses, ref_query) < RTOL[dtype]
    if loss == "cross_entropy":
        assert torch.equal(result.query_accuracies,
                           fastmeta.losses.per_task_accuracy(output, qy))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_reptile_matches_reference(loss, dtype):
    """Reptile's direction theta - mean phi_K is a small difference of large numbers, so
    its error is judged against the scale of theta (the adapted weights themselves, which
    carry all the computation, are compared relatively)."""
    model = mixed_mlp().to(dtype)
    sx, sy, _, _ = batch(loss, 25, 3, 2, dtype)
    results = {}
    for backend in ("cpu", "torch"):
        reptile = fastmeta.Reptile(copy.deepcopy(model), 0.1, inner_steps=5, loss=loss,
                                   backend=backend)
        value = reptile(sx, sy)
        value.backward()
        assert reptile.last_backend == backend
        results[backend] = (value.detach(), [p.grad for p in reptile.model.parameters()])
    assert rel_error(results["cpu"][0], results["torch"][0]) < RTOL[dtype]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    direction = torch.cat([g.reshape(-1) for g in results["cpu"][1]])
    ref_direction = torch.cat([g.reshape(-1) for g in results["torch"][1]])
    assert float((direction - ref_direction).norm() / theta.norm()) < RTOL[dtype]
    assert rel_error(direction, ref_direction) < (1e-8 if dtype == torch.float64 else 1e-2)

    reptile = fastmeta.Reptile(model, 0.1, inner_steps=5, loss=loss, backend="torch")
    adapted = reptile.adapt(sx, sy)
    ref_adapted = torch.cat([w.detach().reshape(25, -1) for w in adapted.fast_weights], 1)
    result = CompiledMLP(model, loss).run(list(model.parameters()), 0.1, 5, "reptile", sx, sy,
                                          want_adapted=True)
    assert rel_error(result.adapted, ref_adapted) < RTOL[dtype]


@pytest.mark.parametrize("steps", [2, 5])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("name", ["maml", "metasgd", "anil"])
def test_wide_first_layer_and_few_support_rows(name, loss, steps):
    """W3's shape in small: a wide first layer and 3 support rows. Second-order MAML then
    keeps the support set's first activations per inner step rather than phi_k's first
    layer (the engine's split history): from K to K + 3 steps its scratch grows by less
    than three first layers. Meta-SGD and ANIL keep the whole history."""
    model = nn.Sequential(nn.Linear(60, 32), nn.Sigmoid(), nn.Linear(32, 16), nn.Tanh(),
                          nn.Linear(16, 4)).double()
    data = batch(loss, 4, 60, 4, torch.float64, support=3, query=7)
    results = run_both(name, model, loss, steps, data)
    (value, grads), (ref_value, ref_grads) = results["cpu"], results["torch"]
    assert rel_error(value, ref_value) < 1e-10
    for g, ref in zip(grads, ref_grads):
        assert rel_error(g, ref) < 1e-10
    if name == "maml":
        engine = CompiledMLP(model, loss)
        one_task = [t[:1] for t in data]  # one task: one thread
        sizes = []
        for k in (steps, steps + 3):
            engine.run(list(model.parameters()), 0.1, k, "second_order", *one_task)
            sizes.append(engine._engine_for(*one_task[::2]).workspace_bytes)
        assert sizes[1] - sizes[0] < 3 * (32 * 60 + 32) * 8


def test_anil_with_a_two_layer_head_and_flattened_inputs():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.Tanh(),
                          nn.Sequential(nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 3))).double()
    sx, sy, qx, qy = classification_batch(5, 4, 6, (3, 4), 3)
    results = {}
    for backend in ("cpu", "torch"):
        anil = fastmeta.ANIL(copy.deepcopy(model), head="3", inner_lr=0.5, inner_steps=2,
                             loss="cross_entropy", backend=backend)
        anil(sx, sy, qx, qy).backward()
        assert anil.last_backend == backend
        results[backend] = [p.grad for p in anil.model.parameters()]
    for g, ref in zip(results["cpu"], results["torch"]):
        assert rel_error(g, ref) < 1e-10


def test_no_grad_evaluation_and_frozen_parameters():
    model = mixed_mlp().double()
    data = batch("cross_entropy", 3, 3, 2, torch.float64)
    maml = fastmeta.MAML(model, 0.3, 2, loss="cross_entropy", backend="cpu")
    reference = fastmeta.MAML(model, 0.3, 2, loss="cross_entropy", backend="torch")
    with torch.no_grad():
        value = maml(*data)
        assert not value.requires_grad
        assert rel_error(value, reference(*data)) < 1e-10
    assert all(p.grad is None for p in model.parameters())
    model[0][0].weight.requires_grad_(False)  # a frozen tensor gets no .grad
    maml(*data).backward()
    assert model[0][0].weight.grad is None and model[0][0].bias.grad is not None


def test_changing_shapes_and_a_diverged_call_leave_later_calls_exact():
    """The engine keeps its scratch memory between calls; new shapes re-plan it, and a call
    whose loss blew up must not leak into the next one."""
    model = mixed_mlp().double()
    maml = fastmeta.MAML(model, 0.2, 2, loss="mse", backend="cpu")
    reference = fastmeta.MAML(model, 0.2, 2, loss="mse", backend="torch")
    for tasks, support in [(2, 5), (7, 3), (2, 5)]:
        data = batch("mse", tasks, 3, 2, torch.float64, support=support)
        assert rel_error(maml(*data), reference(*data)) < 1e-10
    sx, sy, qx, qy = batch("mse", 2, 3, 2, torch.float64, support=5)
    with pytest.raises(FloatingPointError, match="support loss"):
        maml(sx, sy * 1e300, qx, qy)  # finite inputs, but the loss overflows
    data = batch("mse", 2, 3, 2, torch.float64, support=5)
    assert rel_error(maml(*data), reference(*data)) < 1e-10


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["support_x", "support_y", "query_x", "query_y"])
def test_non_finite_inputs_stop_the_engine_before_it_computes(where, value, dtype):
    """A NaN or infinity in support_x, query_x or the mse targets: the raw meta_step returns
    False at once and writes no output (the Python layer then names the tensor and task);
    the next clean call runs normally."""
    engine = backends.core().MlpEngine([3, 7, 2], ["tanh", "identity"], [True, True], 0, "mse")
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(dtype) for s in [(7, 3), (7,), (2, 7), (2,)]]
    data = {"support_x": (4, 5, 3), "support_y": (4, 5, 2), "query_x": (4, 6, 3),
            "query_y": (4, 6, 2)}
    data = {name: rng.standard_normal(shape).astype(dtype) for name, shape in data.items()}
    sentinel = -12345.0
    support_loss, query_loss = np.full((4, 1), sentinel, dtype), np.full(4, sentinel, dtype)
    grads = [np.full(p.shape, sentinel, dtype) for p in params]

    def meta_step():
        return engine.meta_step(params, 0.1, "second_order", 1, data["support_x"],
                                data["support_y"], data["query_x"], data["query_y"], True,
                                support_loss, query_loss, None, grads, None, None)

    data[where][2, 4, 1] = value  # task 2, the last row of the support set
    assert meta_step() is False
    for out in [support_loss, query_loss, *grads]:
        assert (out == sentinel).all()
    data[where][2, 4, 1] = 0.5
    assert meta_step() is True
    for out in [support_loss, query_loss, *grads]:
        assert np.isfinite(out).all() and not (out == sentinel).any()


def test_non_contiguous_inputs():
    model = mixed_mlp().double()
    sx, sy, qx, qy = batch("mse", 4, 3, 2, torch.float64)
    views = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (sx, sy, qx, qy)]
    assert not views[0].is_contiguous()
    maml = fastmeta.MAML(model, 0.1, 2, backend="cpu")
    assert rel_error(maml(*views), maml(sx, sy, qx, qy)) == 0.0


@pytest.mark.parametrize("layout", ["task_slices", "expanded"])
def test_task_strided_inputs_are_read_in_place_and_exactly(layout):
    """Inputs whose tasks are spaced apart (slices of one sample, as Sinusoid.sample gives)
    or share one buffer (stride-0 expand) reach the engine as views: same bits as copies."""
    model = mixed_mlp().double()
    sx, sy, qx, qy = batch("mse", 4, 3, 2, torch.float64)
    if layout == "task_slices":
        x, y = torch.cat([sx, qx], 1), torch.cat([sy, qy], 1)
        views = [x[:, :sx.shape[1]], y[:, :sx.shape[1]], x[:, sx.shape[1]:], y[:, sx.shape[1]:]]
    else:
        views = [t[:1].expand_as(t) for t in (sx, sy, qx, qy)]
    copies = [v.contiguous() for v in views]
    grads = {}
    for name, data in (("views", views), ("copies", copies)):
        model.zero_grad(set_to_none=True)
        maml = fastmeta.MAML(model, 0.1, 2, backend="cpu")
        maml(*data).backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.equal(grads["views"], grads["copies"])


# --------------------------------------------------------------------------------------------
# Which engine runs
# --------------------------------------------------------------------------------------------
def test_auto_picks_the_engine_for_an_mlp_on_cpu():
    data = batch("mse", 2, 3, 2, torch.float32)
    for make in (lambda m: fastmeta.MAML(m, 0.1), lambda m: fastmeta.MetaSGD(m),
                 lambda m: fastmeta.ANIL(m, inner_lr=0.1)):
        alg = make(mixed_mlp())
        assert alg._compiled_reason() is None
        alg(*data)
        assert alg.last_backend == "cpu"
    reptile = fastmeta.Reptile(mixed_mlp(), 0.1)
    reptile(*data[:2])
    assert reptile.last_backend == "cpu"


def test_auto_falls_back_and_cpu_refuses_with_the_reason():
    model = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(), nn.Linear(4, 2))
    data = batch("mse", 2, 3, 2, torch.float32)
    maml = fastmeta.MAML(model, 0.1)
    maml(*data)
    assert maml.last_backend == "torch"
    with pytest.raises(ValueError, match="LeakyReLU"):
        fastmeta.MAML(model, 0.1, backend="cpu")(*data)
    # ANIL whose adapted layer is not at the end: the reference engine serves it
    anil = fastmeta.ANIL(mixed_mlp(), head="0.0", inner_lr=0.1)
    assert "last Linear" in anil._compiled_reason()
    anil(*data)
    assert anil.last_backend == "torch"
    # tied weights: the engine assumes every Linear layer owns its parameters
    shared = nn.Linear(3, 3)
    tied = fastmeta.MAML(nn.Sequential(shared, nn.Tanh(), shared), 0.1)
    assert "parameters" in tied._compiled_reason()
    # inputs with extra dimensions and no Flatten
    x = torch.randn(2, 5, 4, 3)
    maml = fastmeta.MAML(mixed_mlp(), 0.1)
    assert "shape" in maml._compiled_reason(x)


# --------------------------------------------------------------------------------------------
# Determinism and every compiled instruction set
# --------------------------------------------------------------------------------------------
_SCRIPT = textwrap.dedent("""
    import hashlib, os, sys
    import torch
    import fastmeta
    from fastmeta import backends
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # (torch caps it at the cores)
    torch.manual_seed(1234)
    out = []
    for dtype in (torch.float32, torch.float64):
        for name in ("maml", "metasgd", "anil", "reptile"):
            model = fastmeta.models.mlp([20, 33, 17, 5], "tanh").to(dtype)
            sx, qx = torch.randn(25, 5, 20, dtype=dtype), torch.randn(25, 15, 20, dtype=dtype)
            sy, qy = torch.randint(0, 5, (25, 5)), torch.randint(0, 5, (25, 15))
            if name == "reptile":
                alg = fastmeta.Reptile(model, 0.3, 3, loss="cross_entropy", backend="cpu")
                value = alg(sx, sy)
            else:
                make = {"maml": fastmeta.MAML, "metasgd": fastmeta.MetaSGD,
                        "anil": lambda m, *a, **k: fastmeta.ANIL(m, None, *a, **k)}[name]
                alg = make(model, 0.3, 3, loss="cross_entropy", backend="cpu")
                value = alg(sx, sy, qx, qy)
            value.backward()
            out.append(value.detach().numpy().tobytes())
            out += [p.grad.numpy().tobytes() for p in alg.parameters()]
    print(backends.info()["max_threads"], backends.info()["engine_isa"],
          hashlib.sha256(b"".join(out)).hexdigest())
""")


def _run_script(**env):
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=dict(os.environ, **env),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bitwise_identical_with_one_two_and_three_threads():
    """Three threads on this 2-core machine: more threads than cores, so tasks are taken
    from other threads' shares; the sums still follow the same fixed tree."""
    one = _run_script(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    two = _run_script(OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE")
    three = _run_script(OMP_NUM_THREADS="3")
    if backends.info().get("openmp"):
        assert (one[0], two[0], three[0]) == ("1", "2", "3")  # the setting reached the engine
    assert one[2] == two[2] == three[2]


_ISA_SCRIPT = textwrap.dedent("""
    import copy, torch, fastmeta
    from fastmeta import backends
    torch.manual_seed(7)
    worst = 0.0
    for dtype in (torch.float32, torch.float64):
        model = torch.nn.Sequential(torch.nn.Linear(3, 19), torch.nn.Sigmoid(),
                                    torch.nn.Linear(19, 37), torch.nn.Tanh(),
                                    torch.nn.Linear(37, 4)).to(dtype)
        sx, qx = torch.randn(6, 18, 3, dtype=dtype), torch.randn(6, 21, 3, dtype=dtype)
        sy, qy = torch.randint(0, 4, (6, 18)), torch.randint(0, 4, (6, 21))
        grads = {}
        for backend in ("cpu", "torch"):
            m = copy.deepcopy(model)
            fastmeta.MetaSGD(m, 0.3, 2, loss="cross_entropy", backend=backend)(sx, sy, qx, qy).backward()
            grads[backend] = torch.cat([p.grad.reshape(-1) for p in m.parameters()]).double()
        err = float((grads["cpu"] - grads["torch"]).norm() / grads["torch"].norm())
        worst = max(worst, err / (1e-5 if dtype == torch.float32 else 1e-10))
    print(backends.info()["engine_isa"], worst)
""")


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_narrower_instruction_sets_match_reference(isa):
    """The engine is compiled once per instruction set; the tests above run the widest one
    this CPU has. FASTMETA_ISA selects a narrower build (when this CPU and build have it)."""
    result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT],
                            env=dict(os.environ, FASTMETA_ISA=isa, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    used, worst = result.stdout.split()
    if used != isa:
        pytest.skip(f"this CPU or build has no {isa} engine (using {used})")
    assert float(worst) < 1.0


def test_compiled_meta_step_leaves_no_cyclic_garbage():
    """A small meta-step takes ~0.2 ms; reference cycles created by each call make the
    garbage collector run every ~100 steps (a recursive closure in the hot path once cost
    ~30 µs of collector time per step, measured on a busy machine)."""
    import gc

    maml = fastmeta.MAML(fastmeta.models.mlp([1, 8, 1]), 0.1, backend="cpu")
    batch = regression_batch(3, 4, 4, 1, 1, dtype=torch.float32)
    maml(*batch).backward()
    while gc.collect():  # earlier tests' garbage (freeing some can free more)
        pass
    gc.disable()
    try:
        for _ in range(20):
            maml.model.zero_grad(set_to_none=True)
            maml(*batch).backward()
        assert gc.collect() == 0
    finally:
        gc.enable()
