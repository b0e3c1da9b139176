"""The compiled conv engine (fastmeta._core.ConvEngine, fastmeta/engine_conv.py) against the
torch reference engine (fastmeta.MAML / MetaSGD / ANIL / Reptile with backend="torch").

On fresh random inputs: conv4-shaped models with 1 and 3 input channels, 4 to 32 filters,
image sizes 84 (mini-ImageNet), 28, 27, 20, 17, 11 and 9 (odd sizes drop a row and a column
at every pooling), with and without convolution biases, 1 and 3 inner steps, second- and
first-order MAML, both losses. Support and query losses, adapted weights and
meta-gradients agree to a relative error (norm-wise) below 1e-10 in float64 and 1e-5 in
float32 (each meta-gradient tensor on its own: 1e-4), the result is bitwise the same with
one or two threads, and every instruction-set build of the engine agrees with the widest
one.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta import backends
from fastmeta.engine_conv import CompiledConv4, ConvSpec, conv_spec

pytestmark = pytest.mark.skipif(backends._core is None or not hasattr(backends._core, "ConvEngine"),
                                reason="the compiled conv engine is not built")

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# Each tensor of the meta-gradient on its own: in float32, the small ones (an early batch
# norm's shift, say) carry a few times the whole gradient's relative error, in the reference
# engine as much as here (both measured against float64).
TENSOR_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def conv_model(in_channels: int, hidden: int, size: int, n_way: int, blocks: int = 4,
               bias: bool = True) -> nn.Sequential:
    """fastmeta.models.conv4's layers with any number of blocks, image size and conv bias."""
    layers, channels = [], in_channels
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, hidden, 3, padding=1, bias=bias),
                   nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
        channels, size = hidden, size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden * size * size, n_way))


def image_batch(loss: str, tasks: int, support: int, query: int, channels: int, size: int,
                n_way: int, dtype):
    sx = torch.randn(tasks, support, channels, size, size, dtype=dtype)
    qx = torch.randn(tasks, query, channels, size, size, dtype=dtype)
    if loss == "cross_entropy":
        return sx, torch.randint(0, n_way, (tasks, support)), qx, torch.randint(0, n_way, (tasks, query))
    return (sx, torch.randn(tasks, support, n_way, dtype=dtype), qx,
            torch.randn(tasks, query, n_way, dtype=dtype))


def rel_error(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    """Norm-wise relative error of a against the reference b (or against `scale`)."""
    a, b = a.detach().double(), b.detach().double()
    denominator = float(b.norm()) if scale is None else scale
    return float((a - b).norm()) / max(denominator, 1e-300)


def assert_gradients_close(model: nn.Module, grads, ref_grads, rtol: float,
                           tensor_rtol: float) -> None:
    """The whole meta-gradient within rtol (norm-wise), and every tensor's within
    tensor_rtol of its own norm, except the convolution biases': right before batch norm
    their gradient is exactly zero, so both engines give rounding noise there, judged
    against the whole gradient's norm."""
    zero = {id(m.bias) for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is not None}
    flat = torch.cat([g.reshape(-1) for g in grads])
    ref_flat = torch.cat([g.reshape(-1) for g in ref_grads])
    assert rel_error(flat, ref_flat) < rtol
    total = float(ref_flat.double().norm())
    for p, g, ref in zip(model.parameters(), grads, ref_grads):
        assert g.shape == ref.shape and g.dtype == ref.dtype
        assert rel_error(g, ref, total if id(p) in zero else None) < tensor_rtol


# (in_channels, hidden, image size, blocks, conv bias, tasks, inner steps, algorithm, loss)
CASES = [
    (1, 4, 28, 4, True, 3, 1, "second_order", "cross_entropy"),
    (3, 5, 27, 4, True, 1, 3, "second_order", "mse"),
    (3, 6, 9, 3, False, 3, 3, "second_order", "cross_entropy"),
    (1, 8, 28, 4, True, 3, 3, "first_order", "mse"),
    (3, 4, 17, 4, False, 1, 1, "first_order", "cross_entropy"),
    # whole vectors of channels (16, 32): the forward products' axpy form
    (1, 16, 20, 4, True, 2, 2, "second_order", "cross_entropy"),
    (3, 32, 11, 3, False, 2, 1, "second_order", "mse"),
    # mini-ImageNet's 84x84x3 (84 -> 42 -> 21 -> 10 -> 5: an odd size midway)
    (3, 4, 84, 4, True, 1, 1, "second_order", "cross_entropy"),
]


def kink_margin(model: nn.Module, lr: float, loss: str, steps: int, sx, sy, qx,
                algorithm=None) -> float:
    """How close (in float64) the data come to a kink of the meta-gradient: over every
    max-pool window the engine visits (the support set at phi_0 .. phi_{K-1}, the query set
    at phi_K), the smallest distance between a positive maximum and the runner-up, or
    between a maximum and zero (the ReLU's kink). Float32 rounding (about 1e-6 here) may
    route a gradient either way across a smaller margin, and so may the two engines.
    ``algorithm``: a reference algorithm to adapt with (MAML with ``lr`` when None)."""
    if algorithm is None:
        algorithm = fastmeta.MAML(model, lr, steps, loss=loss, backend="torch")
    maml = copy.deepcopy(algorithm).double()
    pools = [i for i, layer in enumerate(maml._batched.layers) if type(layer) is nn.MaxPool2d]
    margin = float("inf")
    with torch.no_grad():
        for k in range(steps + 1):
            weights = maml.adapt(sx.double(), sy if loss == "cross_entropy" else sy.double(),
                                 steps=k).fast_weights
            for x in ([sx] if k < steps else []) + ([qx] if k == steps and qx is not None else []):
                x = x.double()
                for pool in pools:
                    y = maml._batched(weights, x, 0, pool - 1)  # batch norm's output
                    h, w = y.shape[-2] // 2 * 2, y.shape[-1] // 2 * 2
                    windows = y[..., :h, :w].unfold(-2, 2, 2).unfold(-2, 2, 2).flatten(-2)
                    top = windows.topk(2, -1).values
                    margin = min(margin, float(top[..., 0].abs().min()))
                    gaps = (top[..., 0] - top[..., 1])[top[..., 0] > 0]
                    if gaps.numel():
                        margin = min(margin, float(gaps.min()))
    return margin


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_meta_step_matches_reference(case, dtype):
    channels, hidden, size, blocks, bias, tasks, steps, algorithm, loss = case
    n_way = 5 if loss == "cross_entropy" else 2
    lr = 0.3 if loss == "cross_entropy" else 0.1
    model = conv_model(channels, hidden, size, n_way, blocks, bias).to(dtype)
    for _ in range(20):  # float32: data away from the kinks (float64 rounding never nears one)
        sx, sy, qx, qy = image_batch(loss, tasks, 5, 6, channels, size, n_way, dtype)
        if dtype == torch.float64 or kink_margin(model, lr, loss, steps, sx, sy, qx) > 1e-5:
            break
    else:
        pytest.fail("no random batch kept away from the kinks")

    reference = fastmeta.MAML(copy.deepcopy(model), lr, steps,
                              first_order=algorithm == "first_order", loss=loss, backend="torch")
    value = reference(sx, sy, qx, qy)
    value.backward()
    adapted = reference.adapt(sx, sy)
    ref_adapted = torch.cat([w.detach().reshape(tasks, -1) for w in adapted.fast_weights], 1)
    ref_query = fastmeta.losses.per_task_loss(loss, adapted(qx).detach(), qy)

    result = CompiledConv4(model, loss).run(list(model.parameters()), lr, steps, algorithm,
                                            sx, sy, qx, qy, want_adapted=True)
    assert result.all_finite
    rtol = RTOL[dtype]
    assert rel_error(result.query_losses.mean(), value) < rtol
    assert rel_error(result.query_losses, ref_query) < rtol
    assert rel_error(result.support_losses, torch.stack(adapted.support_losses, 1)) < rtol
    assert rel_error(result.adapted, ref_adapted) < rtol
    assert_gradients_close(model, result.grads, [p.grad for p in reference.model.parameters()],
                           rtol, TENSOR_RTOL[dtype])
    if loss == "cross_entropy":
        output = adapted(qx).detach()
        assert torch.equal(result.query_accuracies, fastmeta.losses.per_task_accuracy(output, qy))


def test_losses_only_without_gradient():
    model = conv_model(1, 4, 16, 3).double()
    data = image_batch("cross_entropy", 2, 3, 4, 1, 16, 3, torch.float64)
    engine = CompiledConv4(model, "cross_entropy")
    full = engine.run(list(model.parameters()), 0.3, 2, "second_order", *data)
    losses = engine.run(list(model.parameters()), 0.3, 2, "second_order", *data, need_grad=False)
    assert losses.grads is None
    assert torch.equal(losses.query_losses, full.query_losses)
    assert torch.equal(losses.support_losses, full.support_losses)


# --------------------------------------------------------------------------------------------
# Meta-SGD, ANIL, Reptile
# --------------------------------------------------------------------------------------------
def make_reference(name: str, model: nn.Module, lr: float, steps: int, loss: str):
    """The reference engine's algorithm `name` (Meta-SGD's rates drawn per weight, so the
    rate gradient is tested)."""
    first_order = name.endswith("first-order")
    if name.startswith("metasgd"):
        alg = fastmeta.MetaSGD(model, lr, steps, first_order=first_order, loss=loss, backend="torch")
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for rate in alg.inner_lrs:
                rate.mul_(torch.rand(rate.shape, generator=generator, dtype=rate.dtype) + 0.5)
        return alg
    if name.startswith("anil"):
        return fastmeta.ANIL(model, inner_lr=lr, inner_steps=steps, first_order=first_order,
                             loss=loss, backend="torch")
    return fastmeta.Reptile(model, lr, steps, loss=loss, backend="torch")


# (algorithm, in_channels, hidden, image size, conv bias, tasks, inner steps, loss)
VARIANT_CASES = [
    ("metasgd", 1, 4, 16, True, 3, 2, "cross_entropy"),
    ("metasgd-first-order", 3, 5, 19, False, 2, 3, "mse"),
    ("anil", 1, 5, 16, True, 3, 3, "cross_entropy"),
    ("anil", 3, 4, 17, False, 2, 1, "mse"),
    ("anil-first-order", 1, 4, 16, True, 3, 2, "cross_entropy"),
    ("reptile", 1, 4, 16, True, 3, 3, "cross_entropy"),
    ("reptile", 3, 5, 19, False, 2, 2, "mse"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", VARIANT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_variants_match_reference(case, dtype):
    name, channels, hidden, size, bias, tasks, steps, loss = case
    n_way = 5 if loss == "cross_entropy" else 2
    lr = 0.3 if loss == "cross_entropy" else 0.1
    model = conv_model(channels, hidden, size, n_way, 4, bias).to(dtype)
    reptile = name == "reptile"
    for _ in range(20):  # float32: data away from the kinks
        sx, sy, qx, qy = image_batch(loss, tasks, 5, 6, channels, size, n_way, dtype)
        if dtype == torch.float64:
            break
        alg = make_reference(name, copy.deepcopy(model), lr, steps, loss)
        if kink_margin(model, lr, loss, steps, sx, sy, None if reptile else qx, alg) > 1e-5:
            break
    else:
        pytest.fail("no random batch kept away from the kinks")

    reference = make_reference(name, copy.deepcopy(model), lr, steps, loss)
    value = reference(sx, sy) if reptile else reference(sx, sy, qx, qy)
    value.backward()
    adapted = reference.adapt(sx, sy)
    ref_adapted = torch.cat([w.detach().reshape(tasks, -1) for w in adapted.fast_weights], 1)
    ref_grads = [p.grad for p in reference.model.parameters()]

    meta_sgd = name.startswith("metasgd")
    lrs = [r.detach() for r in reference.inner_lrs] if meta_sgd else lr
    engine = CompiledConv4(model, loss, reference._adapted() if name.startswith("anil") else None)
    assert engine.reason is None and engine.head_only == name.startswith("anil")
    algorithm = ("reptile" if reptile else
                 "first_order" if name.endswith("first-order") else "second_order")
    result = engine.run(list(model.parameters()), lrs, steps, algorithm, sx, sy,
                        *((None, None) if reptile else (qx, qy)), want_adapted=True)
    assert result.all_finite
    rtol = RTOL[dtype]
    assert rel_error(result.support_losses, torch.stack(adapted.support_losses, 1)) < rtol
    assert rel_error(result.adapted, ref_adapted) < rtol
    if reptile:
        # theta - mean phi_K is a small difference of large numbers: judged against theta
        assert result.query_losses is None
        assert rel_error(result.support_losses[:, 0].mean(), value) < rtol
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        direction = torch.cat([g.reshape(-1) for g in result.grads])
        ref_direction = torch.cat([g.reshape(-1) for g in ref_grads])
        assert rel_error(direction, ref_direction, float(theta.double().norm())) < rtol
        return
    assert rel_error(result.query_losses.mean(), value) < rtol
    ref_query = fastmeta.losses.per_task_loss(loss, adapted(qx).detach(), qy)
    assert rel_error(result.query_losses, ref_query) < rtol
    assert_gradients_close(model, result.grads, ref_grads, rtol, TENSOR_RTOL[dtype])
    if meta_sgd:
        ref_lr_grads = [r.grad for r in reference.inner_lrs]
        assert_gradients_close(model, result.lr_grads, ref_lr_grads, rtol, TENSOR_RTOL[dtype])
    else:
        assert result.lr_grads is None


def test_anil_needs_exactly_the_head_adapted():
    model = conv_model(1, 4, 16, 3)
    body = len(list(model.parameters())) - 2
    for adapted in ([True] * body + [False, True], [False] * (body + 1) + [True],
                    [False] * (body - 1) + [True] * 3):
        engine = CompiledConv4(model, "cross_entropy", adapted)
        assert engine.spec is None and "Linear head" in engine.reason
    assert CompiledConv4(model, "cross_entropy", [True] * (body + 2)).head_only is False
    assert CompiledConv4(model, "cross_entropy", [False] * body + [True] * 2).head_only


def test_scratch_grows_with_inner_steps_only_by_parameter_vectors():
    """Second order keeps phi_1 .. phi_K per thread and recomputes activations: from 1 to
    10 inner steps the scratch grows by 9 parameter-sized vectors per thread at most."""
    model = conv_model(1, 8, 28, 5).double()
    data = image_batch("cross_entropy", 3, 5, 15, 1, 28, 5, torch.float64)
    sizes = {}
    for steps in (1, 10):
        engine = CompiledConv4(model, "cross_entropy")
        engine.run(list(model.parameters()), 0.1, steps, "second_order", *data)
        sizes[steps] = engine.engine(28, 28).workspace_bytes
    params = sum(p.numel() for p in model.parameters())
    threads = backends.info()["max_threads"]
    assert sizes[10] - sizes[1] <= 9 * threads * (params * 8 * 5 // 4 + 1024)
    assert sizes[10] < 1.2 * sizes[1]


# --------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------
def test_conv_spec_of_conv4():
    spec = conv_spec(fastmeta.models.conv4(3, 5, 8, 27))
    assert spec == ConvSpec(3, (8,) * 4, (True,) * 4, (1e-5,) * 4, 8, 5, True)
    assert spec.image_reason(27, 27) is None and spec.image_reason(32, 32) is not None
    assert conv_spec(conv_model(1, 4, 9, 2, blocks=3, bias=False)).conv_bias == (False,) * 3


@pytest.mark.parametrize("model, words", [
    (fastmeta.models.mlp([3, 4, 2]), "not conv4-shaped"),
    (nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                   nn.Flatten(), nn.Linear(16, 2)), "3x3"),
    (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                   nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 2)), "affine"),
    (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.MaxPool2d(2),
                   nn.Flatten(), nn.Linear(16, 2)), "Tanh"),
    (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2),
                   nn.Flatten(), nn.Linear(16, 2)), "AvgPool2d"),
    (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                   nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(16, 2)), "MaxPool2d(2)"),
    (nn.Conv2d(1, 4, 3), "not an nn.Sequential"),
])
def test_conv_spec_names_what_it_cannot_run(model, words):
    reason = conv_spec(model)
    assert isinstance(reason, str) and words in reason


# --------------------------------------------------------------------------------------------
# Bad inputs stop at the binding
# --------------------------------------------------------------------------------------------
def test_binding_checks_its_arguments():
    model = conv_model(1, 4, 16, 3).double()
    engine = CompiledConv4(model, "cross_entropy")
    params = list(model.parameters())
    sx, sy, qx, qy = image_batch("cross_entropy", 2, 3, 4, 1, 16, 3, torch.float64)
    with pytest.raises(ValueError, match="13x13 images"):
        engine.run(params, 0.3, 1, "second_order", torch.randn(2, 3, 1, 13, 13).double(), sy, qx, qy)
    with pytest.raises(ValueError, match="differ in shape"):  # 17x17 alone would do
        engine.run(params, 0.3, 1, "second_order", torch.randn(2, 3, 1, 17, 17).double(), sy, qx, qy)
    core = engine.engine(16, 16)
    arrays = [p.detach().numpy() for p in params]
    import numpy as np

    def call(**changes):
        args = dict(params=arrays, lr=0.3, algorithm="second_order", inner_steps=1,
                    support_x=sx.numpy(), support_y=sy.numpy(), query_x=qx.numpy(),
                    query_y=qy.numpy(), need_grad=True, support_loss=np.empty((2, 1)),
                    query_loss=np.empty(2), query_accuracy=None,
                    grad=[np.empty(p.shape) for p in params], lr_grad=None, adapted=None)
        args.update(changes)
        return core.meta_step(**args)

    call()  # the unchanged arguments are fine
    with pytest.raises(ValueError, match="query_x: expected shape"):
        call(query_x=qx[:1].numpy())
    with pytest.raises(ValueError, match="support_x: expected shape"):
        call(support_x=torch.randn(2, 3, 2, 16, 16).double().numpy())
    with pytest.raises(TypeError, match="element format"):
        call(query_x=qx.float().numpy())
    with pytest.raises(ValueError, match="C-contiguous"):
        call(support_x=sx.transpose(3, 4).numpy())
    with pytest.raises(ValueError, match="outside"):
        call(support_y=(sy + 3).numpy())
    with pytest.raises(ValueError, match="params: expected"):
        call(params=arrays[:-1])
    with pytest.raises(ValueError, match="params\\[0\\]: expected 36 elements"):
        call(params=[arrays[1]] + arrays[1:])
    with pytest.raises(ValueError, match="unknown algorithm"):
        call(algorithm="third_order")
    with pytest.raises(ValueError, match="reptile takes a scalar"):
        call(algorithm="reptile", lr=[np.full(p.shape, 0.3) for p in params])
    with pytest.raises(ValueError, match="need query_x"):
        call(query_x=None)
    with pytest.raises(ValueError, match="grad is required"):
        call(grad=None)


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------
_SCRIPT = textwrap.dedent("""
    import hashlib, torch, fastmeta
    from fastmeta.engine_conv import CompiledConv4
    from fastmeta import backends
    torch.manual_seed(0)
    model = fastmeta.models.conv4(1, 5, 6, 16)
    x = torch.randn(5, 9, 1, 16, 16)
    y = torch.randint(0, 5, (5, 9))
    params = list(model.parameters())
    rates = [torch.rand_like(p) * 0.4 for p in params]
    data = (x[:, :4], y[:, :4], x[:, 4:], y[:, 4:])
    plain = CompiledConv4(model, "cross_entropy")
    anil = CompiledConv4(model, "cross_entropy", [False] * (len(params) - 2) + [True] * 2)
    digest = hashlib.sha256()
    for result in (plain.run(params, 0.4, 2, "second_order", *data),
                   plain.run(params, rates, 2, "second_order", *data),
                   anil.run(params, 0.4, 2, "second_order", *data),
                   plain.run(params, 0.4, 2, "reptile", *data[:2])):
        for t in [result.support_losses, *result.grads, *(result.lr_grads or [])]:
            digest.update(t.numpy().tobytes())
    print(backends.info()["max_threads"], digest.hexdigest())
""")


def _run_script(**env):
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=dict(os.environ, **env),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bitwise_identical_with_one_and_two_threads():
    one = _run_script(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    two = _run_script(OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE")
    assert one[0] == "1" and two[0] == "2"
    assert one[1] == two[1]


_ISA_SCRIPT = textwrap.dedent("""
    import sys, torch, fastmeta
    from fastmeta.engine_conv import CompiledConv4
    from fastmeta import backends
    torch.manual_seed(0)
    model = fastmeta.models.conv4(3, 4, 5, 19).double()
    x = torch.randn(2, 7, 3, 19, 19, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 7))
    result = CompiledConv4(model, "cross_entropy").run(
        list(model.parameters()), 0.4, 2, "second_order", x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])
    torch.save(torch.cat([g.reshape(-1) for g in result.grads]), sys.argv[1])
    print(backends.info()["engine_isa"])
""")


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_every_instruction_set_build_agrees(isa, tmp_path):
    """The engine is compiled once per instruction set (different vector widths, so
    different padding): each build gives the widest one's meta-gradient in float64."""
    results = {}
    for name in ("widest", isa):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if name != "widest":
            env["FASTMETA_ISA"] = isa
        else:
            env.pop("FASTMETA_ISA", None)
        path = tmp_path / f"{name}.pt"
        run = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        results[name] = (run.stdout.strip(), torch.load(path))
    if results["widest"][0] == results[isa][0]:
        pytest.skip(f"this CPU's widest build is {isa}")
    assert results[isa][0] == isa
    assert rel_error(results[isa][1], results["widest"][1]) < 1e-12


# --- Routing: backend="auto" runs conv4-shaped models on this engine -----------------------
def _learners(model, backend):
    return {"maml": fastmeta.MAML(model, 0.1, 2, loss="cross_entropy", backend=backend),
            "fomaml": fastmeta.MAML(model, 0.1, 2, first_order=True, loss="cross_entropy",
                                    backend=backend),
            "metasgd": fastmeta.MetaSGD(model, 0.1, 2, loss="cross_entropy", backend=backend),
            "anil": fastmeta.ANIL(model, inner_lr=0.1, inner_steps=2, loss="cross_entropy",
                                  backend=backend),
            "reptile": fastmeta.Reptile(model, 0.1, 2, loss="cross_entropy", backend=backend)}


@pytest.mark.parametrize("name", ["maml", "fomaml", "metasgd", "anil", "reptile"])
def test_auto_backend_runs_conv4_on_the_engine(name):
    """fastmeta.models.conv4 on the CPU: backend="auto" picks the compiled engine, and its
    .grad equals the reference engine's (float64)."""
    torch.manual_seed(3)
    model = fastmeta.models.conv4(in_channels=1, n_way=3, hidden=4, image_size=16).double()
    reference = copy.deepcopy(model)
    sx, sy, qx, qy = image_batch("cross_entropy", 2, 3, 4, 1, 16, 3, torch.float64)
    auto, torch_learner = _learners(model, "auto")[name], _learners(reference, "torch")[name]
    args = (sx, sy) if name == "reptile" else (sx, sy, qx, qy)
    loss, expected = auto(*args), torch_learner(*args)
    assert auto.last_backend == "cpu"
    assert rel_error(loss.detach(), expected.detach()) < 1e-10
    loss.backward()
    expected.backward()
    got = torch.cat([p.grad.reshape(-1) for p in auto.parameters()])
    want = torch.cat([p.grad.reshape(-1) for p in torch_learner.parameters()])
    assert rel_error(got, want) < 1e-10


def test_conv_engine_rejects_nan_with_the_task_index():
    model = fastmeta.models.conv4(in_channels=1, n_way=3, hidden=4, image_size=16).double()
    sx, sy, qx, qy = image_batch("cross_entropy", 3, 3, 4, 1, 16, 3, torch.float64)
    qx[2, 1, 0, 5, 5] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    maml = fastmeta.MAML(model, 0.1, loss="cross_entropy", backend="cpu")
    with pytest.raises(FloatingPointError, match=r"query_x .*task 2"):
        maml(sx, sy, qx, qy)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
