"""The learners inside the rest of torch: module hooks (pruning, spectral_norm, user hooks),
shared or re-registered parameters, inference mode, higher-order and repeated backward
passes, torch.func transforms, autocast, and adapted models as snapshots.

Where the compiled engine cannot honour one of these, ``backend="auto"`` must fall back to
the reference engine (and give the oracle's numbers) and ``backend="cpu"`` must say why;
nothing may silently compute something else.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import fastmeta
from conftest import classification_batch
from test_gradients import ORACLE_RTOL, fastmeta_grads, oracle, rel_err

LR, STEPS = 0.3, 2


@pytest.fixture(autouse=True)
def _quiet_fallbacks():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _mlp(bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8, bias=bias), nn.ReLU(), nn.Linear(8, 3)).double()


def _conv() -> nn.Sequential:
    return fastmeta.models.conv4(1, 3, hidden=4, image_size=16).double()


def _batch(model: nn.Module):
    shape = (1, 16, 16) if isinstance(model[0], nn.Conv2d) else 4
    return classification_batch(2, 3, 4, shape, 3)


def _hooked(case: str) -> nn.Sequential:
    if case == "forward_pre_hook":
        model = _mlp()
        model[0].register_forward_pre_hook(lambda module, inputs: (inputs[0] * 2,))
    elif case == "forward_hook":
        model = _mlp()
        model[2].register_forward_hook(lambda module, inputs, output: output.tanh())
    elif case.startswith("pruned"):
        model = _mlp(bias=case.endswith("with_bias"))
        prune.l1_unstructured(model[0], "weight", amount=0.5)
    elif case == "spectral_norm":
        model = _mlp(bias=False)
        nn.utils.spectral_norm(model[0])
        model.eval()  # (in training mode every call moves its power iteration on)
    else:  # "bn_reordered": pruning re-registers gamma after beta (and adds a hook)
        model = _conv()
        prune.identity(model[1], "weight")
    return model


def _check_against_oracle(learner: nn.Module, model: nn.Module, batch) -> None:
    with torch.no_grad():  # hooks recompute weights as graph leaves, which deepcopy takes
        model(batch[0][0])
    expected_loss, expected, _ = oracle(model, batch, "cross_entropy", LR, STEPS)
    loss, grads = fastmeta_grads(learner, batch, list(model.parameters()))
    assert abs(float(loss) - float(expected_loss)) <= ORACLE_RTOL * abs(float(expected_loss))
    assert rel_err(grads, expected) < ORACLE_RTOL


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("case", ["forward_pre_hook", "forward_hook", "pruned_no_bias",
                                  "pruned_with_bias", "spectral_norm", "bn_reordered"])
def test_hooked_models_give_the_oracles_numbers(case, backend):
    model = _hooked(case)
    learner = fastmeta.MAML(model, LR, STEPS, loss="cross_entropy", backend=backend)
    _check_against_oracle(learner, model, _batch(model))
    assert learner.last_backend == "torch"


def test_hooks_added_and_removed_between_calls_are_followed():
    model = _mlp()
    learner = fastmeta.MAML(model, LR, STEPS, loss="cross_entropy")
    batch = _batch(model)
    _check_against_oracle(learner, model, batch)
    assert learner.last_backend == "cpu"
    handle = model[0].register_forward_pre_hook(lambda module, inputs: (inputs[0] * 2,))
    _check_against_oracle(learner, model, batch)
    assert learner.last_backend == "torch"
    with pytest.raises(ValueError, match="Linear has hooks"):
        fastmeta.MAML(model, LR, STEPS, loss="cross_entropy", backend="cpu")(*batch)
    handle.remove()
    _check_against_oracle(learner, model, batch)
    assert learner.last_backend == "cpu"
    handle = nn.modules.module.register_module_forward_hook(lambda module, inputs, output: output)
    try:
        fastmeta_grads(learner, batch, list(model.parameters()))
        assert learner.last_backend == "torch"
    finally:
        handle.remove()


def _tied() -> nn.Sequential:
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), first, nn.Tanh(), second).double()


def _repeated() -> nn.Sequential:
    layer = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), layer, nn.Tanh(), layer,
                         nn.Linear(8, 3)).double()


def _reregistered() -> nn.Sequential:
    model = _mlp()
    weight = model[0].weight
    del model[0].weight
    model[0].weight = weight  # now registered after the bias
    return model


def _reregistered_batch_norm() -> nn.Sequential:
    model = _conv()
    weight = model[1].weight
    del model[1].weight
    model[1].weight = weight  # gamma after beta: one shape, told apart only by order
    return model


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("make", [_tied, _repeated, _reregistered, _reregistered_batch_norm])
def test_shared_and_reregistered_parameters_give_the_oracles_numbers(make, backend):
    model = make()
    learner = fastmeta.MAML(model, LR, STEPS, loss="cross_entropy", backend=backend)
    _check_against_oracle(learner, model, _batch(model))


def _learners(model):
    return [fastmeta.MAML(model, LR, STEPS, loss="cross_entropy"),
            fastmeta.MetaSGD(model, LR, STEPS, loss="cross_entropy"),
            fastmeta.ANIL(model, inner_lr=LR, inner_steps=STEPS, loss="cross_entropy"),
            fastmeta.Reptile(model, LR, STEPS, loss="cross_entropy")]


@pytest.mark.parametrize("make", [_mlp, _conv])
def test_inference_mode_gives_what_no_grad_gives(make):
    model = make()
    sx, sy, qx, qy = _batch(model)
    for learner in _learners(model):
        with torch.no_grad():
            expected = learner.adapt(sx, sy)(qx)
        with torch.inference_mode():
            got = learner.adapt(sx, sy)(qx)
        assert torch.equal(got, expected), type(learner).__name__
    reference = fastmeta.MAML(model, LR, STEPS, loss="cross_entropy", backend="torch")
    with torch.no_grad():
        expected = reference(sx, sy, qx, qy)
    with torch.inference_mode():
        assert torch.equal(reference(sx, sy, qx, qy), expected)


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_a_precomputed_gradient_refuses_create_graph_and_a_second_backward(algorithm):
    model = _mlp()
    sx, sy, qx, qy = _batch(model)
    if algorithm == "maml":
        learner = fastmeta.MAML(model, LR, STEPS, loss="cross_entropy")
        batch = (sx, sy, qx, qy)
    else:
        learner = fastmeta.Reptile(model, LR, STEPS, loss="cross_entropy", backend="torch")
        batch = (sx, sy)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(learner(*batch), list(model.parameters()), create_graph=True)
    loss = learner(*batch)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used by a backward pass"):
        loss.backward()


def test_the_reference_engine_differentiates_its_meta_gradient():
    model = _mlp()
    batch = _batch(model)
    learner = fastmeta.MAML(model, LR, STEPS, loss="cross_entropy", backend="torch")
    grads = torch.autograd.grad(learner(*batch), list(model.parameters()), create_graph=True)
    penalty = sum((g * g).sum() for g in grads)
    assert penalty.requires_grad
    (second,) = torch.autograd.grad(penalty, [model[2].bias])
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_torch_func_transforms_run_on_the_reference_engine():
    model = _mlp()
    batch = _batch(model)
    learner = fastmeta.MAML(model, LR, STEPS, loss="cross_entropy")
    _, expected = fastmeta_grads(learner, batch, list(model.parameters()))
    params = {name: p.detach() for name, p in learner.named_parameters()}
    grads = torch.func.grad(
        lambda p: torch.func.functional_call(learner, p, batch))(params)
    assert rel_err(list(grads.values()), expected) < ORACLE_RTOL
    compiled_only = fastmeta.MAML(model, LR, STEPS, loss="cross_entropy", backend="cpu")
    with pytest.raises(ValueError, match="torch.func transform"):
        torch.func.grad(lambda p: torch.func.functional_call(compiled_only, p, batch))(params)


def test_autocast_runs_on_the_reference_engine():
    model = _mlp().float()
    batch = [t.float() if t.is_floating_point() else t for t in _batch(model)]
    learner = fastmeta.MAML(model, LR, STEPS, loss="cross_entropy")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        learner(*batch)
        assert learner.last_backend == "torch"
        with pytest.raises(ValueError, match="autocast is on"):
            fastmeta.MAML(model, LR, STEPS, loss="cross_entropy", backend="cpu")(*batch)
    learner(*batch)
    assert learner.last_backend == "cpu"


@pytest.mark.parametrize("steps", [0, 2])
def test_an_adapted_model_is_a_snapshot(steps):
    model = _mlp()
    sx, sy, qx, _ = _batch(model)
    for learner in _learners(model):
        with torch.no_grad():
            adapted = learner.adapt(sx, sy, steps)
            before = adapted(qx).clone()
            for p in model.parameters():
                p.add_(1.0)
            assert torch.equal(adapted(qx), before), type(learner).__name__
            for p in model.parameters():
                p.sub_(1.0)



@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_fully_frozen_model_gives_a_loss_without_a_graph(backend):
    model = _mlp().requires_grad_(False)
    loss = fastmeta.MAML(model, LR, STEPS, loss="cross_entropy", backend=backend)(*_batch(model))
    assert not loss.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()
