"""Shared benchmark workloads and implementations (used by compare.py and the pytest-benchmark suite).

Everything here is benchmark-only: the comparison packages (learn2learn, higher) are imported
lazily and are never dependencies of fastmeta.

A *workload* is a model architecture plus one fixed, seeded meta-batch; an *algorithm* is
second-order MAML, first-order MAML or Reptile with a number of inner steps; an
*implementation* turns (workload, algorithm, model) into a ``step()`` that runs one full
meta-step (zero the gradients, forward, backward) and leaves the meta-gradient in the
model's ``.grad``.
"""
from __future__ import annotations

import copy
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastmeta

NUM_THREADS = 2


class Unavailable(Exception):
    """An implementation that cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------
@dataclass
class Workload:
    key: str                      # "W1" .. "W4"
    title: str
    make_model: Callable[[], nn.Module]
    loss: str                     # "mse" | "cross_entropy"
    inner_lr: float
    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    layer_flops: list   # matmul/conv FLOPs of each layer's forward, per sample
    notes: str = ""
    base_model: nn.Module = field(init=False, repr=False)

    def __post_init__(self):
        torch.manual_seed(0)
        self.base_model = self.make_model()

    @property
    def tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def n_support(self) -> int:
        return self.support_x.shape[1]

    @property
    def n_query(self) -> int:
        return self.query_x.shape[1]

    def fresh_model(self) -> nn.Module:
        """A copy of the one seeded initial model: every implementation starts from the same weights."""
        return copy.deepcopy(self.base_model)


def mlp_layer_flops(sizes) -> list:
    return [2.0 * a * b for a, b in zip(sizes[:-1], sizes[1:])]


def conv4_layer_flops(in_channels=1, hidden=64, image_size=28, n_way=5) -> list:
    flops, channels, size = [], in_channels, image_size
    for _ in range(4):
        flops.append(2.0 * size * size * hidden * channels * 9)   # 3x3 conv, padding 1
        channels, size = hidden, size // 2
    flops.append(2.0 * hidden * size * size * n_way)
    return flops


SINUSOID_SIZES = [1, 40, 40, 1]
OMNIGLOT_MLP_SIZES = [784, 256, 128, 64, 64, 5]


def sinusoid_workload(meta_batch=25, k_shot=10, q_query=10) -> Workload:
    tasks = fastmeta.data.Sinusoid(k_shot=k_shot, q_query=q_query, seed=0).sample(meta_batch)
    return Workload(
        "W1", f"sinusoid MLP 1-40-40-1, K={k_shot}+{q_query}, meta-batch {meta_batch}",
        lambda: fastmeta.models.mlp(SINUSOID_SIZES), "mse", 0.01,
        tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y,
        mlp_layer_flops(SINUSOID_SIZES))


def _few_shot_batch(meta_batch, n_way, k_shot, q_query, sample_shape, seed=0):
    """Synthetic data with Omniglot's shapes (timing does not depend on the pixel values)."""
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(meta_batch, n_way * k_shot, *sample_shape, generator=g)
    qx = torch.rand(meta_batch, n_way * q_query, *sample_shape, generator=g)
    sy = torch.arange(n_way).repeat_interleave(k_shot).repeat(meta_batch, 1)
    qy = torch.arange(n_way).repeat_interleave(q_query).repeat(meta_batch, 1)
    return sx, sy, qx, qy


def omniglot_mlp_workload(meta_batch=32, n_way=5, k_shot=1, q_query=15) -> Workload:
    sx, sy, qx, qy = _few_shot_batch(meta_batch, n_way, k_shot, q_query, (784,))
    sizes = OMNIGLOT_MLP_SIZES[:-1] + [n_way]
    return Workload(
        "W3", f"Omniglot MLP 784-256-128-64-64-{n_way}, {n_way}-way {k_shot}-shot, "
              f"{q_query} queries/class, meta-batch {meta_batch}",
        lambda: fastmeta.models.mlp(sizes), "cross_entropy", 0.4, sx, sy, qx, qy,
        mlp_layer_flops(sizes), "synthetic 28x28 inputs (flattened)")


def conv4_workload(meta_batch=32, n_way=5, k_shot=1, q_query=15) -> Workload:
    return _conv4_workload("W2", "Omniglot", 1, 64, 28, 0.4, meta_batch, n_way, k_shot, q_query)


def mini_imagenet_workload(meta_batch=4, n_way=5, k_shot=1, q_query=15) -> Workload:
    # (the MAML paper's mini-ImageNet setting: 32 filters, inner rate 0.01, 5 inner steps)
    return _conv4_workload("W4", "mini-ImageNet", 3, 32, 84, 0.01, meta_batch, n_way, k_shot,
                           q_query)


def _conv4_workload(key, data, channels, hidden, size, inner_lr, meta_batch, n_way, k_shot, q_query):
    sx, sy, qx, qy = _few_shot_batch(meta_batch, n_way, k_shot, q_query, (channels, size, size))
    return Workload(
        key, f"{data} conv4 (hidden {hidden}, {size}x{size}x{channels}), {n_way}-way "
             f"{k_shot}-shot, {q_query} queries/class, meta-batch {meta_batch}",
        lambda: fastmeta.models.conv4(in_channels=channels, n_way=n_way, hidden=hidden,
                                      image_size=size),
        "cross_entropy", inner_lr, sx, sy, qx, qy,
        conv4_layer_flops(channels, hidden, size, n_way),
        f"synthetic {size}x{size}x{channels} inputs; batch norm with batch statistics")


WORKLOADS = {"W1": sinusoid_workload, "W2": conv4_workload, "W3": omniglot_mlp_workload,
             "W4": mini_imagenet_workload}


# ---------------------------------------------------------------------------------------------
# Algorithms and their analytic cost
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Algorithm:
    kind: str        # "maml2" (second-order MAML), "fomaml", "reptile"
    steps: int

    @property
    def label(self) -> str:
        name = {"maml2": "MAML 2nd-order", "fomaml": "MAML 1st-order", "reptile": "Reptile"}[self.kind]
        return f"{name}, {self.steps} step{'s' if self.steps != 1 else ''}"

    @property
    def first_order(self) -> bool:
        return self.kind != "maml2"


def gradient_flops(workload: Workload, rows: int) -> float:
    """One gradient over ``rows`` samples: forward F plus backward 2F (input and weight
    gradients), except that the first layer's input is data and needs no gradient:
    3F - F_0, with F_0 the first layer's forward."""
    forward = sum(workload.layer_flops) * rows
    return 3 * forward - workload.layer_flops[0] * rows


def useful_flops(workload: Workload, algo: Algorithm) -> float:
    """Analytic useful FLOPs of one meta-step (matmul/conv FLOPs only; element-wise work,
    batch norm and pooling not counted).

    Forward = 2*M*N*K per layer; a gradient costs 3 forwards (less the first layer's input
    gradient, see gradient_flops). Per task, with G_s / G_q a support / query gradient:
    second-order MAML = K G_s (inner loop) + 2K G_s (reverse sweep: forward + backward +
    R-forward + R-backward per step; the first layer's R-terms in R{x} vanish exactly as
    its input gradient does) + G_q, i.e. ENGINE.md's (3K+1) gradient-costs with support and
    query sizes kept apart; first-order MAML = K G_s + G_q; Reptile = K G_s.
    """
    grad_s = gradient_flops(workload, workload.n_support)
    grad_q = gradient_flops(workload, workload.n_query)
    k = algo.steps
    if algo.kind == "maml2":
        per_task = 3 * k * grad_s + grad_q
    elif algo.kind == "fomaml":
        per_task = k * grad_s + grad_q
    else:
        per_task = k * grad_s
    return workload.tasks * per_task


# ---------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------
def _per_task_loss(kind: str, output: Tensor, target: Tensor) -> Tensor:
    if kind == "mse":
        return F.mse_loss(output, target)
    return F.cross_entropy(output, target)


def _zero_grad(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _set_reptile_grad(model: nn.Module, finals_sum: list[Tensor], tasks: int) -> None:
    """``.grad = theta - mean_t phi_t``, Reptile's meta-gradient (as fastmeta.Reptile gives)."""
    for p, s in zip(model.parameters(), finals_sum):
        p.grad = p.detach() - s / tasks


def fastmeta_impl(backend: str):
    def build(w: Workload, algo: Algorithm, model: nn.Module):
        if algo.kind == "reptile":
            learner = fastmeta.Reptile(model, w.inner_lr, algo.steps, loss=w.loss, backend=backend)
            args = (w.support_x, w.support_y)
        else:
            learner = fastmeta.MAML(model, w.inner_lr, algo.steps, first_order=algo.first_order,
                                    loss=w.loss, backend=backend)
            args = (w.support_x, w.support_y, w.query_x, w.query_y)

        def step():
            _zero_grad(model)
            learner(*args).backward()

        try:  # backend="cpu" raises ValueError (with the reason) where it cannot serve yet
            step()
        except ValueError as error:
            raise Unavailable(str(error).replace("backend='cpu' cannot serve this call: ", "")) from None
        return step
    return build


def torch_func_impl(w: Workload, algo: Algorithm, model: nn.Module):
    """torch.func: vmap over tasks of (functional_call + torch.func.grad); torch.func.grad is
    itself differentiable, so the outer backward gives the exact second-order meta-gradient."""
    from torch.func import functional_call, grad, vmap

    loss_kind = w.loss

    def task_loss(params, x, y):
        return _per_task_loss(loss_kind, functional_call(model, params, (x,)), y)

    def adapt(params, x, y):
        for _ in range(algo.steps):
            g = grad(task_loss)(params, x, y)
            if algo.first_order:
                g = {k: v.detach() for k, v in g.items()}
            params = {k: params[k] - w.inner_lr * g[k] for k in params}
        return params

    if algo.kind == "reptile":
        batched = vmap(adapt, in_dims=(None, 0, 0))

        def step():
            _zero_grad(model)
            params = {k: v.detach() for k, v in model.named_parameters()}
            with torch.no_grad():
                finals = batched(params, w.support_x, w.support_y)
            _set_reptile_grad(model, [finals[k].sum(0) for k, _ in model.named_parameters()], w.tasks)
        return step

    def task_meta(params, sx, sy, qx, qy):
        return task_loss(adapt(params, sx, sy), qx, qy)

    batched = vmap(task_meta, in_dims=(None, 0, 0, 0, 0))

    def step():
        _zero_grad(model)
        params = dict(model.named_parameters())
        batched(params, w.support_x, w.support_y, w.query_x, w.query_y).mean().backward()
    return step


def loop_impl(w: Workload, algo: Algorithm, model: nn.Module):
    """The textbook loop: one task at a time, torch.autograd.grad(create_graph=True)."""
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]

    def forward(params, x):
        return functional_call(model, dict(zip(names, params)), (x,))

    def adapt(params, x, y, create_graph):
        for _ in range(algo.steps):
            loss = _per_task_loss(w.loss, forward(params, x), y)
            grads = torch.autograd.grad(loss, params, create_graph=create_graph)
            params = [p - w.inner_lr * g for p, g in zip(params, grads)]
        return params

    if algo.kind == "reptile":
        def step():
            _zero_grad(model)
            sums = [torch.zeros_like(p) for p in model.parameters()]
            for t in range(w.tasks):
                params = [p.detach().requires_grad_() for p in model.parameters()]
                final = adapt(params, w.support_x[t], w.support_y[t], False)
                for s, f in zip(sums, final):
                    s += f.detach()
            _set_reptile_grad(model, sums, w.tasks)
        return step

    def step():
        _zero_grad(model)
        for t in range(w.tasks):
            params = adapt(list(model.parameters()), w.support_x[t], w.support_y[t],
                           not algo.first_order)
            loss = _per_task_loss(w.loss, forward(params, w.query_x[t]), w.query_y[t])
            (loss / w.tasks).backward()
    return step


def load_learn2learn_maml():
    """``learn2learn.algorithms.maml`` without running learn2learn's package ``__init__``
    (which imports torchvision, gym, ...): empty package modules with the right ``__path__``
    are put in sys.modules first, so only maml.py, base_learner.py and utils are executed."""
    if "learn2learn.algorithms.maml" in sys.modules:
        return sys.modules["learn2learn.algorithms.maml"]
    if "learn2learn" in sys.modules:
        roots = list(sys.modules["learn2learn"].__path__)
    else:
        spec = importlib.util.find_spec("learn2learn")
        if spec is None or not spec.submodule_search_locations:
            raise Unavailable("not installed (see benchmarks/install_comparisons.sh)")
        roots = list(spec.submodule_search_locations)
    for name, paths in (("learn2learn", roots),
                        ("learn2learn.algorithms", [os.path.join(r, "algorithms") for r in roots])):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = paths
            module.__package__ = name
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            module.__spec__.submodule_search_locations = paths
            sys.modules[name] = module
    try:
        return importlib.import_module("learn2learn.algorithms.maml")
    except Exception as error:  # pragma: no cover - depends on the installed version
        raise Unavailable(f"not installed ({type(error).__name__}: {error})") from None


def learn2learn_impl(w: Workload, algo: Algorithm, model: nn.Module):
    """learn2learn's MAML wrapper: clone() per task, adapt() per inner step, backward per task."""
    l2l_maml = load_learn2learn_maml()
    maml = l2l_maml.MAML(model, lr=w.inner_lr, first_order=algo.first_order)

    if algo.kind == "reptile":
        def step():
            _zero_grad(model)
            sums = [torch.zeros_like(p) for p in model.parameters()]
            for t in range(w.tasks):
                learner = maml.clone()
                for _ in range(algo.steps):
                    learner.adapt(_per_task_loss(w.loss, learner(w.support_x[t]), w.support_y[t]))
                for s, f in zip(sums, learner.parameters()):
                    s += f.detach()
            _set_reptile_grad(model, sums, w.tasks)
        return step

    def step():
        _zero_grad(model)
        for t in range(w.tasks):
            learner = maml.clone()
            for _ in range(algo.steps):
                learner.adapt(_per_task_loss(w.loss, learner(w.support_x[t]), w.support_y[t]))
            loss = _per_task_loss(w.loss, learner(w.query_x[t]), w.query_y[t])
            (loss / w.tasks).backward()
    return step


def higher_impl(w: Workload, algo: Algorithm, model: nn.Module):
    """higher's innerloop_ctx with a differentiable SGD; first-order via track_higher_grads=False."""
    try:
        import higher
    except Exception as error:
        raise Unavailable(f"not installed ({type(error).__name__}: {error})") from None
    inner_opt = torch.optim.SGD(model.parameters(), lr=w.inner_lr)
    params = list(model.parameters())

    def run_task(t, track):
        ctx = higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                   track_higher_grads=track)
        with ctx as (fmodel, diffopt):
            for _ in range(algo.steps):
                diffopt.step(_per_task_loss(w.loss, fmodel(w.support_x[t]), w.support_y[t]))
            return fmodel

    if algo.kind == "reptile":
        def step():
            _zero_grad(model)
            sums = [torch.zeros_like(p) for p in params]
            for t in range(w.tasks):
                fmodel = run_task(t, False)
                for s, f in zip(sums, fmodel.parameters()):
                    s += f.detach()
            _set_reptile_grad(model, sums, w.tasks)
        return step

    def step():
        _zero_grad(model)
        if algo.first_order:  # the fast weights are fresh leaves: hand their gradient to theta
            for p in params:
                p.grad = torch.zeros_like(p)
            for t in range(w.tasks):
                fmodel = run_task(t, False)
                loss = _per_task_loss(w.loss, fmodel(w.query_x[t]), w.query_y[t]) / w.tasks
                for p, g in zip(params, torch.autograd.grad(loss, list(fmodel.parameters()))):
                    p.grad += g
            return
        for t in range(w.tasks):
            fmodel = run_task(t, True)
            loss = _per_task_loss(w.loss, fmodel(w.query_x[t]), w.query_y[t])
            (loss / w.tasks).backward()
    return step


IMPLEMENTATIONS = {
    "fastmeta-cpu": fastmeta_impl("cpu"),
    "fastmeta-torch": fastmeta_impl("torch"),
    "torch.func": torch_func_impl,
    "loop": loop_impl,
    "learn2learn": learn2learn_impl,
    "higher": higher_impl,
}

DESCRIPTIONS = {
    "fastmeta-cpu": "fastmeta, backend=\"cpu\" (compiled engine)",
    "fastmeta-torch": "fastmeta, backend=\"torch\" (batched torch reference engine: the baseline)",
    "torch.func": "torch.func: vmap over tasks of functional_call + torch.func.grad (differentiable)",
    "loop": "plain per-task loop: functional_call + torch.autograd.grad(create_graph=True)",
    "learn2learn": "learn2learn 0.2.0 MAML: clone() / adapt() per task, backward per task",
    "higher": "higher 0.2.1 innerloop_ctx + differentiable SGD, backward per task",
}


def build(impl: str, w: Workload, algo: Algorithm):
    """(model, step) for an implementation, or raises Unavailable."""
    model = w.fresh_model()
    return model, IMPLEMENTATIONS[impl](w, algo, model)


def meta_gradient(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def oracle_gradient(w: Workload, algo: Algorithm) -> Tensor:
    """The meta-gradient in float64 (fastmeta's reference engine on a float64 copy of the same
    weights and data): the yardstick for every float32 implementation's accuracy."""
    model = w.fresh_model().double()
    sx, qx = w.support_x.double(), w.query_x.double()
    sy, qy = ((y.double() if y.is_floating_point() else y) for y in (w.support_y, w.query_y))
    if algo.kind == "reptile":
        fastmeta.Reptile(model, w.inner_lr, algo.steps, loss=w.loss, backend="torch")(sx, sy).backward()
    else:
        fastmeta.MAML(model, w.inner_lr, algo.steps, first_order=algo.first_order, loss=w.loss,
                      backend="torch")(sx, sy, qx, qy).backward()
    return meta_gradient(model)
