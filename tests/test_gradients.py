"""The meta-gradients are exact.

Every algorithm's gradient is checked, in float64, against

* an independent oracle: a plain per-task Python loop over ``torch.func.functional_call`` on
  a fresh copy of the model, differentiating through the inner SGD steps with
  ``torch.autograd.grad(create_graph=True)`` (no batching over tasks, no ``vmap``), and
* central finite differences of the meta-loss along random directions (the final judge; it
  knows nothing about autograd).

Batch norm uses batch statistics everywhere (conv4 is built with
``track_running_stats=False``); the oracle's per-task loop runs ``F.batch_norm`` in training
mode. ``torch.func.vmap`` is deliberately not used as an oracle: its batch-norm batching rule
gives wrong second-order gradients.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmeta
from fastmeta import functional
from fastmeta.functional import TaskBatchedModel
from conftest import classification_batch, regression_batch

ORACLE_RTOL = 1e-10
# CPU_PER_TASK_CONV_MIN forcing each way of running convolutions on the CPU: one grouped
# convolution for all tasks, or a loop over tasks (functional.py picks by size).
CONV_PATHS = {"grouped": float("inf"), "per_task": 0}
FD_RTOL = 1e-6
FD_EPS = 1e-5           # step along a unit-norm direction (float64)
FD_DIRECTIONS = 3


# --------------------------------------------------------------------------------------------
# Helpers: models, meta-batches, the oracle, finite differences
# --------------------------------------------------------------------------------------------
class Wrapped(nn.Module):
    """The same layers as a Sequential ``body + head``, but not an ``nn.Sequential``: fastmeta
    must take its generic per-task path (``functional_call``) for it."""

    def __init__(self, sequential: nn.Sequential):
        super().__init__()
        layers = list(sequential)
        self.body = nn.Sequential(*layers[:-1])
        self.head = layers[-1]

    def forward(self, x):
        return self.head(self.body(x))


def make_case(kind: str, loss: str, num_tasks: int = 2, dtype=torch.float64):
    """A small model and a meta-batch for it: ``kind`` is mlp-relu, mlp-tanh or conv4."""
    if kind.startswith("mlp"):
        activation = kind.split("-")[1]
        out = 1 if loss == "mse" else 3
        model = fastmeta.models.mlp([2, 12, 12, out], activation).to(dtype)
        if loss == "mse":
            batch = regression_batch(num_tasks, 6, 5, 2, out, dtype)
        else:
            batch = classification_batch(num_tasks, 6, 5, 2, out, dtype)
    else:
        model = fastmeta.models.conv4(in_channels=1, n_way=3, hidden=4, image_size=16).to(dtype)
        batch = classification_batch(num_tasks, 3, 4, (1, 16, 16), 3, dtype)
    return model, batch


def task_loss(kind: str, output, target):
    return F.mse_loss(output, target) if kind == "mse" else F.cross_entropy(output, target)


def oracle(model: nn.Module, batch, loss: str, inner_lr, steps: int, *, second_order=True,
           lrs=None, adapt_names=None):
    """The meta-loss and its gradient w.r.t. the model's parameters (and ``lrs``, per-parameter
    learning-rate tensors, when given), one task at a time.

    ``adapt_names``: the parameters the inner loop updates (all when None).
    Returns ``(meta_loss, grads_theta, grads_lrs)``.
    """
    model = copy.deepcopy(model)
    names = [name for name, _ in model.named_parameters()]
    theta = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    if lrs is None:
        rates = {name: inner_lr for name in names}
        rate_leaves = []
    else:
        rate_leaves = [lr.detach().clone().requires_grad_() for lr in lrs]
        rates = dict(zip(names, rate_leaves))
    adapt_names = names if adapt_names is None else list(adapt_names)
    sx, sy, qx, qy = batch
    total = 0.0
    for t in range(sx.shape[0]):
        weights = dict(theta)
        for _ in range(steps):
            support = task_loss(loss, functional_call(model, weights, (sx[t],)), sy[t])
            grads = torch.autograd.grad(support, [weights[n] for n in adapt_names],
                                        create_graph=second_order)
            weights = {**weights,
                       **{n: weights[n] - rates[n] * g for n, g in zip(adapt_names, grads)}}
        total = total + task_loss(loss, functional_call(model, weights, (qx[t],)), qy[t])
    meta_loss = total / sx.shape[0]
    grads = torch.autograd.grad(meta_loss, [theta[n] for n in names] + rate_leaves)
    return meta_loss.detach(), list(grads[:len(names)]), list(grads[len(names):])


def first_order_oracle(model: nn.Module, batch, loss: str, inner_lr: float, steps: int):
    """First-order MAML by its definition: adapt each task with inner gradients taken as
    constants (no graph at all), then average the query gradient at the adapted weights."""
    model = copy.deepcopy(model)
    names = [name for name, _ in model.named_parameters()]
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    sx, sy, qx, qy = batch
    mean_grad = [torch.zeros_like(theta[n]) for n in names]
    for t in range(sx.shape[0]):
        phi = {n: theta[n].clone() for n in names}
        for _ in range(steps):
            leaves = {n: phi[n].requires_grad_() for n in names}
            support = task_loss(loss, functional_call(model, leaves, (sx[t],)), sy[t])
            grads = torch.autograd.grad(support, [leaves[n] for n in names])
            phi = {n: (phi[n] - inner_lr * g).detach() for n, g in zip(names, grads)}
        leaves = {n: phi[n].requires_grad_() for n in names}
        query = task_loss(loss, functional_call(model, leaves, (qx[t],)), qy[t])
        for acc, g in zip(mean_grad, torch.autograd.grad(query, [leaves[n] for n in names])):
            acc += g / sx.shape[0]
    return mean_grad


def fastmeta_grads(algorithm: nn.Module, batch, tensors):
    """Runs ``loss = algorithm(*batch); loss.backward()``; returns the loss and the .grad of
    ``tensors`` (all of which must have received one)."""
    for p in algorithm.parameters():
        p.grad = None
    loss = algorithm(*batch)
    loss.backward()
    assert all(t.grad is not None for t in tensors)
    return loss.detach(), [t.grad.detach().clone() for t in tensors]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def rel_err(actual, expected) -> float:
    actual, expected = flat(actual).detach(), flat(expected).detach()
    return float((actual - expected).norm() / expected.norm())


class NotSmooth(Exception):
    """The meta-loss has a kink or jump within the finite-difference step of the point."""


def directional_check(loss_fn, tensors, grads, directions: int = FD_DIRECTIONS,
                      eps: float = FD_EPS):
    """Central finite differences of ``loss_fn()`` along random unit directions in the space
    of ``tensors`` vs the analytic ``<grads, d>``; returns the worst relative error.

    The denominator is ``max(|<g, d>|, 1e-3 |g|)``, so a direction nearly orthogonal to the
    gradient cannot turn round-off into a spurious failure.

    ReLU and max-pooling make the support loss's gradient, hence the second-order meta-loss
    itself, jump where a pre-activation crosses zero or a pooling window changes its
    arg-max. A direction whose +-eps segment straddles such a point is detected (the
    differences at eps and eps/2 disagree) and replaced by a fresh one; a wrong gradient
    cannot hide this way, since there both differences agree with each other and not with
    it. Raises NotSmooth when most directions straddle one (the point sits on a kink).
    """
    g = flat(grads).detach()
    originals = [t.detach().clone() for t in tensors]

    def at(direction, step):
        with torch.no_grad():
            for t, o, x in zip(tensors, originals, direction):
                t.copy_(o + step * x)
            return float(loss_fn())

    worst, clean, tries = 0.0, 0, 0
    try:
        while clean < directions:
            tries += 1
            if tries > 3 * directions:
                raise NotSmooth(f"only {clean} of {tries - 1} directions were smooth")
            d = [torch.randn_like(t) for t in tensors]
            norm = flat(d).norm()
            d = [x / norm for x in d]
            analytic = float(g @ flat(d))
            scale = max(abs(analytic), 1e-3 * float(g.norm()))
            coarse = (at(d, eps) - at(d, -eps)) / (2 * eps)
            fine = (at(d, eps / 2) - at(d, -eps / 2)) / eps
            if abs(coarse - fine) > 0.5 * FD_RTOL * scale:
                continue
            clean += 1
            worst = max(worst, abs(coarse - analytic) / scale)
    finally:
        with torch.no_grad():
            for t, o in zip(tensors, originals):
                t.copy_(o)
    return worst


def on_smooth_point(check, attempts: int = 3):
    """Runs ``check()`` (which draws its own random case) until it finds a point where the
    meta-loss is smooth; such points are all but certain, kinks are measure-zero."""
    for _ in range(attempts - 1):
        try:
            return check()
        except NotSmooth:
            pass
    return check()


CASES = [("mlp-relu", "mse"), ("mlp-relu", "cross_entropy"), ("mlp-tanh", "mse"),
         ("mlp-tanh", "cross_entropy"), ("conv4", "cross_entropy")]
INNER_LR = {"mse": 0.05, "cross_entropy": 0.4}


# --------------------------------------------------------------------------------------------
# Second-order MAML
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("kind,loss", CASES)
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_maml_matches_per_task_oracle(kind, loss, steps, backend):
    model, batch = make_case(kind, loss)
    lr = INNER_LR[loss]
    maml = fastmeta.MAML(model, lr, inner_steps=steps, loss=loss, backend=backend)
    params = list(model.parameters())
    value, grads = fastmeta_grads(maml, batch, params)
    expected_value, expected, _ = oracle(model, batch, loss, lr, steps)
    assert abs(float(value - expected_value)) <= 1e-12 * abs(float(expected_value))
    assert rel_err(grads, expected) < ORACLE_RTOL
    # The check can tell second order from first order: the Hessian terms matter here.
    assert rel_err(first_order_oracle(model, batch, loss, lr, steps), expected) > 1e-4


@pytest.mark.parametrize("sample", [(5,), (3, 5)])
def test_batch_norm_1d_matches_the_oracle(sample):
    """BatchNorm1d over [features] or [channels, length] samples, as torch's (statistics
    over the samples, and over the length too)."""
    model = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(sample[0]), nn.Tanh(), nn.Flatten(),
                          nn.Linear(5 * (len(sample) == 2 and 3 or 1), 3)).double()
    batch = classification_batch(2, 6, 5, sample, 3)
    maml = fastmeta.MAML(model, 0.4, inner_steps=2, loss="cross_entropy", backend="torch")
    assert maml._batched.batched
    value, grads = fastmeta_grads(maml, batch, list(model.parameters()))
    expected_value, expected, _ = oracle(model, batch, "cross_entropy", 0.4, 2)
    assert abs(float(value - expected_value)) <= 1e-12 * abs(float(expected_value))
    assert rel_err(grads, expected) < ORACLE_RTOL


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("kind,loss", CASES)
def test_maml_matches_finite_differences(kind, loss, steps):
    def check():
        model, batch = make_case(kind, loss)
        maml = fastmeta.MAML(model, INNER_LR[loss], inner_steps=steps, loss=loss,
                             backend="torch")
        params = list(model.parameters())
        _, grads = fastmeta_grads(maml, batch, params)
        with torch.no_grad():
            return directional_check(lambda: maml(*batch), params, grads)

    assert on_smooth_point(check) < FD_RTOL


# --------------------------------------------------------------------------------------------
# First-order MAML
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("kind,loss", [("mlp-tanh", "mse"), ("mlp-relu", "cross_entropy"),
                                       ("conv4", "cross_entropy")])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_first_order_maml(kind, loss, steps, backend):
    model, batch = make_case(kind, loss, num_tasks=3)
    lr = INNER_LR[loss]
    fomaml = fastmeta.MAML(model, lr, inner_steps=steps, first_order=True, loss=loss,
                           backend=backend)
    params = list(model.parameters())
    _, grads = fastmeta_grads(fomaml, batch, params)
    expected = first_order_oracle(model, batch, loss, lr, steps)
    assert rel_err(grads, expected) < ORACLE_RTOL
    # ... and it is not the second-order gradient.
    _, second, _ = oracle(model, batch, loss, lr, steps)
    assert rel_err(grads, second) > 1e-4


# --------------------------------------------------------------------------------------------
# Meta-SGD: gradients w.r.t. the initial weights and the learned learning rates
# --------------------------------------------------------------------------------------------
def _meta_sgd(kind, loss, steps, first_order=False, backend="torch"):
    model, batch = make_case(kind, loss)
    msgd = fastmeta.MetaSGD(model, INNER_LR[loss], inner_steps=steps, first_order=first_order,
                            loss=loss, backend=backend)
    with torch.no_grad():  # distinct rates per weight, so a wrong lr-gradient cannot hide
        for rate in msgd.inner_lrs:
            rate.mul_(torch.rand_like(rate) + 0.5)
    return model, batch, msgd


META_SGD_CASES = [("mlp-tanh", "mse"), ("mlp-relu", "cross_entropy"), ("conv4", "cross_entropy")]


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("kind,loss", META_SGD_CASES)
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_meta_sgd_matches_oracle(kind, loss, steps, backend):
    model, batch, msgd = _meta_sgd(kind, loss, steps, backend=backend)
    params, rates = list(model.parameters()), list(msgd.inner_lrs)
    assert set(map(id, msgd.parameters())) == set(map(id, params + rates))
    _, grads = fastmeta_grads(msgd, batch, params + rates)
    _, expected_theta, expected_rates = oracle(model, batch, loss, None, steps, lrs=rates)
    assert rel_err(grads[:len(params)], expected_theta) < ORACLE_RTOL
    assert rel_err(grads[len(params):], expected_rates) < ORACLE_RTOL


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("kind,loss", META_SGD_CASES)
def test_meta_sgd_matches_finite_differences(kind, loss, steps):
    def check():
        model, batch, msgd = _meta_sgd(kind, loss, steps)
        params, rates = list(model.parameters()), list(msgd.inner_lrs)
        _, grads = fastmeta_grads(msgd, batch, params + rates)
        with torch.no_grad():
            # the learning rates alone, then everything at once
            return max(directional_check(lambda: msgd(*batch), rates, grads[len(params):]),
                       directional_check(lambda: msgd(*batch), params + rates, grads,
                                         directions=2))

    assert on_smooth_point(check) < FD_RTOL


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_meta_sgd_first_order_rate_gradient(backend):
    """First-order Meta-SGD keeps the exact learning-rate gradient  -sum_k g_k * v_K."""
    model, batch, msgd = _meta_sgd("mlp-tanh", "mse", steps=2, first_order=True,
                                   backend=backend)
    params, rates = list(model.parameters()), list(msgd.inner_lrs)
    _, grads = fastmeta_grads(msgd, batch, params + rates)
    _, expected_theta, expected_rates = oracle(model, batch, "mse", None, 2, lrs=rates,
                                               second_order=False)
    assert rel_err(grads[:len(params)], expected_theta) < ORACLE_RTOL
    assert rel_err(grads[len(params):], expected_rates) < ORACLE_RTOL


# --------------------------------------------------------------------------------------------
# ANIL: only the head adapts
# --------------------------------------------------------------------------------------------
ANIL_CASES = [("mlp-relu", "mse"), ("mlp-tanh", "cross_entropy"), ("conv4", "cross_entropy")]


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("kind,loss", ANIL_CASES)
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_anil_matches_oracle(kind, loss, steps, backend):
    model, batch = make_case(kind, loss)
    lr = INNER_LR[loss]
    anil = fastmeta.ANIL(model, inner_lr=lr, inner_steps=steps, loss=loss, backend=backend)
    assert anil._features_from() > 0  # the Sequential fast path: features computed once
    head = [name for name, _ in model.named_parameters()][-2:]  # the last Linear
    params = list(model.parameters())
    _, grads = fastmeta_grads(anil, batch, params)
    _, expected, _ = oracle(model, batch, loss, lr, steps, adapt_names=head)
    assert rel_err(grads, expected) < ORACLE_RTOL
    # ANIL is not MAML: adapting the body too gives a different gradient.
    _, maml_grads, _ = oracle(model, batch, loss, lr, steps)
    assert rel_err(grads, maml_grads) > 1e-4


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("kind,loss", ANIL_CASES)
def test_anil_matches_finite_differences(kind, loss, steps):
    def check():
        model, batch = make_case(kind, loss)
        anil = fastmeta.ANIL(model, inner_lr=INNER_LR[loss], inner_steps=steps, loss=loss,
                             backend="torch")
        params = list(model.parameters())
        _, grads = fastmeta_grads(anil, batch, params)
        with torch.no_grad():
            return directional_check(lambda: anil(*batch), params, grads, directions=2)

    assert on_smooth_point(check) < FD_RTOL


def _nested_mlp():
    return nn.Sequential(nn.Sequential(nn.Linear(2, 12), nn.Tanh()),
                         nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))).double()


@pytest.mark.parametrize("head,nested,tail", [("0", False, False), ("2", False, False),
                                              ("module", False, True), ("1", True, True),
                                              ("1.2", True, True)])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_anil_head_choices(head, nested, tail, backend):
    """Any submodule can be the head; a tail of the Sequential takes the features-once path."""
    model, batch = make_case("mlp-tanh", "cross_entropy")
    if nested:
        model = _nested_mlp()
    chosen = model[4] if head == "module" else head
    anil = fastmeta.ANIL(model, head=chosen, inner_lr=0.4, inner_steps=2, loss="cross_entropy",
                         backend=backend)
    assert (anil._features_from() > 0) == tail
    head_module = chosen if isinstance(chosen, nn.Module) else dict(model.named_modules())[head]
    head_ids = {id(p) for p in head_module.parameters()}
    names = [n for n, p in model.named_parameters() if id(p) in head_ids]
    params = list(model.parameters())
    _, grads = fastmeta_grads(anil, batch, params)
    _, expected, _ = oracle(model, batch, "cross_entropy", 0.4, 2, adapt_names=names)
    assert rel_err(grads, expected) < ORACLE_RTOL


@pytest.mark.parametrize("kind,loss", [("mlp-relu", "mse"), ("conv4", "cross_entropy")])
def test_maml_generic_path_matches_oracle_and_finite_differences(kind, loss):
    """A model that is not an nn.Sequential runs task by task (functional_call); its
    second-order meta-gradient is exact too, and equals the Sequential path's."""
    def check():
        model, batch = make_case(kind, loss)
        wrapped = Wrapped(model)
        maml = fastmeta.MAML(wrapped, INNER_LR[loss], inner_steps=2, loss=loss, backend="torch")
        assert not maml._batched.batched
        params = list(wrapped.parameters())
        _, grads = fastmeta_grads(maml, batch, params)
        _, expected, _ = oracle(wrapped, batch, loss, INNER_LR[loss], 2)
        assert rel_err(grads, expected) < ORACLE_RTOL
        sequential = fastmeta.MAML(model, INNER_LR[loss], inner_steps=2, loss=loss,
                                   backend="torch")
        _, grads_seq = fastmeta_grads(sequential, batch, list(model.parameters()))
        assert rel_err(grads, grads_seq) < ORACLE_RTOL
        with torch.no_grad():
            return directional_check(lambda: maml(*batch), params, grads, directions=2)

    assert on_smooth_point(check) < FD_RTOL


@pytest.mark.parametrize("head", [None, "head"])
def test_anil_sequential_equals_generic_path(head):
    model, batch = make_case("conv4", "cross_entropy")
    wrapped = Wrapped(copy.deepcopy(model))
    fast = fastmeta.ANIL(model, inner_lr=0.4, inner_steps=2, loss="cross_entropy", backend="torch")
    generic = fastmeta.ANIL(wrapped, head=head, inner_lr=0.4, inner_steps=2,
                            loss="cross_entropy", backend="torch")
    assert fast._batched.batched and not generic._batched.batched
    value, grads = fastmeta_grads(fast, batch, list(model.parameters()))
    value_g, grads_g = fastmeta_grads(generic, batch, list(wrapped.parameters()))
    assert abs(float(value - value_g)) <= 1e-12 * abs(float(value))
    assert rel_err(grads_g, grads) < ORACLE_RTOL
    assert float(flat(grads[:-2]).norm()) > 0  # the body does get a meta-gradient


# --------------------------------------------------------------------------------------------
# Reptile
# --------------------------------------------------------------------------------------------
def reptile_oracle(model, support_x, support_y, loss, inner_lr, steps):
    """theta - mean_t phi_t, with phi_t from a per-task loop of plain SGD; and the mean
    support loss at theta."""
    model = copy.deepcopy(model)
    names = [name for name, _ in model.named_parameters()]
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    total_phi = {n: torch.zeros_like(theta[n]) for n in names}
    first_losses = []
    for t in range(support_x.shape[0]):
        phi = {n: theta[n].clone() for n in names}
        for step in range(steps):
            leaves = {n: phi[n].requires_grad_() for n in names}
            value = task_loss(loss, functional_call(model, leaves, (support_x[t],)), support_y[t])
            if step == 0:
                first_losses.append(value.detach())
            grads = torch.autograd.grad(value, [leaves[n] for n in names])
            with torch.no_grad():
                phi = {n: phi[n] - inner_lr * g for n, g in zip(names, grads)}
        for n in names:
            total_phi[n] += phi[n].detach()
    num_tasks = support_x.shape[0]
    direction = [theta[n] - total_phi[n] / num_tasks for n in names]
    return torch.stack(first_losses).mean(), direction


@pytest.mark.parametrize("backend", ["torch", "cpu", "auto"])
@pytest.mark.parametrize("kind,loss", [("mlp-tanh", "mse"), ("conv4", "cross_entropy")])
def test_reptile_direction_matches_manual_sgd(kind, loss, backend):
    if backend == "cpu" and not fastmeta.backends.info()["core_available"]:
        pytest.skip("fastmeta's compiled core is unavailable or disabled")
    model, (sx, sy, _, _) = make_case(kind, loss, num_tasks=4)
    lr, steps = INNER_LR[loss], 3
    reptile = fastmeta.Reptile(model, lr, inner_steps=steps, loss=loss, backend=backend)
    params = list(model.parameters())
    value, grads = fastmeta_grads(reptile, (sx, sy), params)
    expected_value, expected = reptile_oracle(model, sx, sy, loss, lr, steps)
    assert abs(float(value - expected_value)) <= 1e-12 * abs(float(expected_value))
    assert rel_err(grads, expected) < ORACLE_RTOL
    # An SGD step with rate eps moves theta to theta + eps (mean phi - theta).
    before = [p.detach().clone() for p in params]
    torch.optim.SGD(params, lr=0.5).step()
    for p, b, d in zip(params, before, expected):
        torch.testing.assert_close(p.detach(), b - 0.5 * d, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# The batched Sequential path equals the generic per-task path
# --------------------------------------------------------------------------------------------
def _exotic_sequential():
    """Every layer kind the batched path supports, nested Sequentials and a grouped conv."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2),
                      nn.BatchNorm2d(4, track_running_stats=False)),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 6, 3, stride=1, bias=False),
        nn.BatchNorm2d(6, affine=False, track_running_stats=False),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 1 * 1, 8),
        nn.BatchNorm1d(8, track_running_stats=False),
        nn.Tanh(),
        nn.Identity(),
        nn.Linear(8, 3),
        nn.ReLU(),
    ).double()


@pytest.fixture(params=sorted(CONV_PATHS))
def conv_path(request, monkeypatch):
    """Runs a test with the CPU's convolutions grouped, then task by task."""
    monkeypatch.setattr(functional, "CPU_PER_TASK_CONV_MIN", CONV_PATHS[request.param])
    return request.param


@pytest.mark.parametrize("which", ["conv4", "exotic", "mlp"])
def test_task_batched_sequential_equals_generic_path(which, conv_path):
    if which == "conv4":
        model = fastmeta.models.conv4(in_channels=2, n_way=3, hidden=4, image_size=16).double()
        x = torch.randn(3, 5, 2, 16, 16, dtype=torch.float64)
    elif which == "exotic":
        model = _exotic_sequential()
        x = torch.randn(3, 5, 2, 8, 8, dtype=torch.float64)
    else:
        model = fastmeta.models.mlp([3, 7, 5, 2], "tanh").double()
        x = torch.randn(3, 5, 3, dtype=torch.float64)
    num_tasks = x.shape[0]
    batched, generic = TaskBatchedModel(model), TaskBatchedModel(Wrapped(model))
    assert batched.batched and not generic.batched
    assert batched.names != generic.names and len(batched.names) == len(generic.names)
    # Different weights for every task.
    params = [(p.detach().unsqueeze(0) + 0.3 * torch.randn(num_tasks, *p.shape,
                                                           dtype=p.dtype)).requires_grad_()
              for p in model.parameters()]
    out_b, out_g = batched(params, x), generic(params, x)
    assert out_b.shape == out_g.shape == (num_tasks, x.shape[1], 3 if which != "mlp" else 2)
    torch.testing.assert_close(out_b, out_g, rtol=1e-12, atol=1e-12)
    # Each task only sees its own weights: task 0's output ignores task 1's weights.
    (dep,) = torch.autograd.grad(out_b[0].sum(), [params[-1]], retain_graph=True)
    assert float(dep[1:].abs().max()) == 0.0
    # First- and second-order derivatives agree (Hessian-vector products by double backward).
    probe = torch.randn_like(out_b)
    vector = [torch.randn_like(p) for p in params]
    results = []
    for out in (out_b, out_g):
        grads = torch.autograd.grad((out * probe).sum(), params, create_graph=True)
        hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vector)), params,
                                  allow_unused=True)
        hvp = [torch.zeros_like(p) if h is None else h for h, p in zip(hvp, params)]
        results.append((grads, hvp))
    assert rel_err(results[0][0], results[1][0]) < 1e-11
    assert rel_err(results[0][1], results[1][1]) < 1e-10


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_through_either_conv_path_matches_oracle(conv_path, steps):
    """Second-order MAML on conv4 equals the per-task oracle whichever way the CPU runs the
    convolutions (the small test models run grouped by default)."""
    model, batch = make_case("conv4", "cross_entropy", num_tasks=3)
    lr = INNER_LR["cross_entropy"]
    maml = fastmeta.MAML(model, lr, inner_steps=steps, loss="cross_entropy", backend="torch")
    value, grads = fastmeta_grads(maml, batch, list(model.parameters()))
    expected_value, expected, _ = oracle(model, batch, "cross_entropy", lr, steps)
    assert abs(float(value - expected_value)) <= 1e-12 * abs(float(expected_value))
    assert rel_err(grads, expected) < ORACLE_RTOL


def test_cpu_convolutions_grouped_or_per_task_by_size():
    """The size heuristic: the small digits conv net runs grouped, the MAML paper's conv4
    (64 filters, 28x28) task by task; one task, or layers past the convolutions, always
    run as one call."""
    def per_task(model, x, start=0):
        batched = TaskBatchedModel(model)
        return batched._convolutions_per_task(x, start, len(batched.layers))

    digits = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                           nn.Flatten(), nn.Linear(32 * 4 * 4, 5))
    conv4 = fastmeta.models.conv4(in_channels=1, n_way=5, hidden=64, image_size=28)
    assert not per_task(digits, torch.zeros(16, 5, 1, 8, 8))
    assert per_task(conv4, torch.zeros(16, 5, 1, 28, 28))
    assert not per_task(conv4, torch.zeros(1, 5, 1, 28, 28))
    assert not per_task(conv4, torch.zeros(16, 5, 64 * 1 * 1), start=len(conv4) - 1)


def test_batched_batch_norm_second_order_matches_finite_differences(conv_path):
    """The batched path's batch norm, written from primitives, has exact second derivatives:
    its Hessian-vector product equals finite differences of its gradient."""
    model = fastmeta.models.conv4(in_channels=1, n_way=3, hidden=4, image_size=16).double()
    batched = TaskBatchedModel(model)
    x = torch.randn(2, 4, 1, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 4))
    base = [p.detach().unsqueeze(0).repeat(2, *([1] * p.dim())) for p in model.parameters()]

    def gradient(weights, create_graph=False):
        weights = [w.detach().requires_grad_() for w in weights] if not create_graph else weights
        out = batched(weights, x)
        value = F.cross_entropy(out.reshape(-1, 3), y.reshape(-1))
        return torch.autograd.grad(value, weights, create_graph=create_graph)

    leaves = [b.clone().requires_grad_() for b in base]
    grads = gradient(leaves, create_graph=True)
    v = [torch.randn_like(b) for b in base]
    norm = flat(v).norm()
    v = [t / norm for t in v]
    hvp = torch.autograd.grad(sum((g * t).sum() for g, t in zip(grads, v)), leaves)
    eps = 1e-5
    plus = gradient([b + eps * t for b, t in zip(base, v)])
    minus = gradient([b - eps * t for b, t in zip(base, v)])
    numeric = [(p - m) / (2 * eps) for p, m in zip(plus, minus)]
    assert rel_err(hvp, numeric) < 1e-6


# --------------------------------------------------------------------------------------------
# float32 sanity
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["maml", "metasgd", "anil"])
@pytest.mark.parametrize("kind,loss", [("mlp-tanh", "mse"), ("conv4", "cross_entropy")])
def test_float32_matches_float64(kind, loss, algorithm):
    model64, batch64 = make_case(kind, loss)
    model32 = copy.deepcopy(model64).float()
    batch32 = [t.float() if t.is_floating_point() else t for t in batch64]
    grads = []
    for model, batch in ((model32, batch32), (model64, batch64)):
        if algorithm == "maml":
            algo = fastmeta.MAML(model, INNER_LR[loss], inner_steps=2, loss=loss)
        elif algorithm == "metasgd":
            algo = fastmeta.MetaSGD(model, INNER_LR[loss], inner_steps=2, loss=loss)
        else:
            algo = fastmeta.ANIL(model, inner_lr=INNER_LR[loss], inner_steps=2, loss=loss)
        _, g = fastmeta_grads(algo, batch, list(algo.parameters()))
        assert all(t.dtype == model.parameters().__next__().dtype for t in g)
        grads.append([t.double() for t in g])
    assert rel_err(grads[0], grads[1]) < 1e-4


# --------------------------------------------------------------------------------------------
# Thread count (this process runs single-threaded, see conftest.py)
# --------------------------------------------------------------------------------------------
_THREADED_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[3])
import torch
import fastmeta
from test_gradients import threaded_case  # (its conftest import sets one thread: undo that)
torch.set_num_threads(int(sys.argv[2]))
threads = (torch.get_num_threads(), fastmeta.backends.info().get("max_threads"))
torch.save((threads, threaded_case()), sys.argv[1])
"""


def threaded_case():
    """Meta-gradients of every algorithm on the default backend, from a fixed seed."""
    torch.manual_seed(2024)
    results = []
    for kind, loss in (("mlp-relu", "mse"), ("mlp-tanh", "cross_entropy"),
                       ("conv4", "cross_entropy")):
        model, batch = make_case(kind, loss, num_tasks=6)
        for algo in (fastmeta.MAML(model, INNER_LR[loss], inner_steps=2, loss=loss),
                     fastmeta.MAML(model, INNER_LR[loss], inner_steps=2, loss=loss,
                                   first_order=True),
                     fastmeta.MetaSGD(model, INNER_LR[loss], inner_steps=2, loss=loss),
                     fastmeta.ANIL(model, inner_lr=INNER_LR[loss], inner_steps=2, loss=loss)):
            results.append(fastmeta_grads(algo, batch, list(algo.parameters()))[1])
        reptile = fastmeta.Reptile(model, INNER_LR[loss], inner_steps=2, loss=loss)
        results.append(fastmeta_grads(reptile, batch[:2], list(model.parameters()))[1])
    return results


def test_meta_gradients_do_not_depend_on_thread_count(tmp_path):
    """Two intra-op / OpenMP threads (torch's and the compiled core's) give the same
    meta-gradients as one."""
    path = tmp_path / "threads2.pt"
    # Passive waiting: spinning OpenMP threads crawl when the machine is busy.
    env = dict(os.environ, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE")
    result = subprocess.run([sys.executable, "-c", _THREADED_SCRIPT, str(path), "2",
                             os.path.dirname(os.path.abspath(__file__))],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    threads, threaded = torch.load(path)
    assert threads[0] == 2 and threads[1] in (None, 2)  # the setting took effect
    single = threaded_case()
    assert len(threaded) == len(single)
    for a, b in zip(threaded, single):
        assert rel_err(a, b) < 1e-12
