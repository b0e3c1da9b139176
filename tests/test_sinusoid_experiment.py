"""The sinusoid experiment as a library: configuration, bit-identical resume, evaluation,
checkpoints and the confidence interval."""
from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
from unittest import mock
import torch

import fastmeta
from fastmeta import checkpoint
from fastmeta.experiments import EXPERIMENTS, get
from fastmeta.experiments import sinusoid as S
from fastmeta.stats import format_ci, mean_ci


# mean_ci -------------------------------------------------------------------------------------
def test_mean_ci_known_values():
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    assert half == pytest.approx(1.96 * math.sqrt(2.5) / math.sqrt(5))  # sample std sqrt(2.5)
    assert half == pytest.approx(1.3859292911256333)
    # Constant values: no spread.
    assert mean_ci([0.5] * 7) == (0.5, 0.0)
    # Tensors and arrays are accepted; z is configurable.
    values = torch.tensor([2.0, 4.0, 6.0, 8.0])
    mean, half = mean_ci(values, z=1.0)
    assert mean == 5.0 and half == pytest.approx(np.std([2, 4, 6, 8], ddof=1) / 2)
    assert mean_ci(np.array([[1.0, 3.0]]))[0] == 2.0


def test_mean_ci_edge_cases():
    mean, half = mean_ci([4.0])
    assert mean == 4.0 and math.isnan(half)
    with pytest.raises(ValueError):
        mean_ci([])
    assert format_ci(0.7712, 0.0321) == "0.771 ± 0.032"
    assert format_ci(1.0, math.nan) == "1.000"


# configuration ---------------------------------------------------------------------------------
def test_config_defaults():
    assert EXPERIMENTS["sinusoid"] == "fastmeta.experiments.sinusoid" and get("sinusoid") is S
    config = S.make_config({})
    assert config["algorithm"] == "maml" and config["inner_steps"] == 1
    assert config["meta_batch"] == 25 and config["shots"] == 10 and config["inner_lr"] == 0.01
    assert config["outer_lr"] == 1e-3 and config["eval_tasks"] == 600
    assert config["output"] == os.path.join("runs", "sinusoid-maml")
    reptile = S.make_config({"algorithm": "reptile", "inner_steps": None})
    assert reptile["inner_steps"] == 5 and reptile["output"].endswith("sinusoid-reptile")
    assert S.make_config({"algorithm": "reptile", "inner_steps": 2})["inner_steps"] == 2
    with pytest.raises(ValueError, match="shots"):
        S.make_config({"shots": 0})
    with pytest.raises(ValueError, match="algorithm"):
        S.make_config({"algorithm": "protonet"})
    with pytest.raises(ValueError):
        get("no-such-dataset")


@pytest.mark.parametrize("name, kind", [("maml", fastmeta.MAML), ("fomaml", fastmeta.MAML),
                                        ("metasgd", fastmeta.MetaSGD), ("anil", fastmeta.ANIL),
                                        ("reptile", fastmeta.Reptile)])
def test_build(name, kind):
    model, wrapper = S.build(S.make_config({"algorithm": name}))
    assert isinstance(wrapper, kind) and wrapper.model is model
    assert getattr(wrapper, "first_order", False) == (name == "fomaml")


# resume -----------------------------------------------------------------------------------------
def _train(tmp_path, name, iterations, algorithm="maml", resume=False):
    config = S.make_config({"algorithm": algorithm, "iterations": iterations, "log_every": 10,
                            "checkpoint_every": 25, "output": str(tmp_path / name)})
    S.train(config, resume=resume, quiet=True, evaluate_after=False)
    return checkpoint.load(tmp_path / name / "checkpoint.pt")


@pytest.mark.parametrize("algorithm", ["maml", "metasgd", "reptile"])
def test_resume_is_bit_identical(tmp_path, algorithm):
    straight = _train(tmp_path, "straight", 60, algorithm)
    _train(tmp_path, "resumed", 30, algorithm)
    resumed = _train(tmp_path, "resumed", 60, algorithm, resume=True)
    assert straight["iteration"] == resumed["iteration"] == 60
    assert straight["algorithm"].keys() == resumed["algorithm"].keys()
    for key, value in straight["algorithm"].items():
        assert torch.equal(value, resumed["algorithm"][key]), key
    if algorithm == "metasgd":
        assert any(key.startswith("inner_lrs") for key in straight["algorithm"])
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert torch.equal(straight["sampler"], resumed["sampler"])
    # The metrics logs agree on every iteration and loss (timings differ).
    logs = [[(r["iteration"], r["loss"]) for r in S.read_metrics(tmp_path / name / "metrics.jsonl")]
            for name in ("straight", "resumed")]
    assert logs[0] == logs[1] and [i for i, _ in logs[0]] == [10, 20, 30, 40, 50, 60]


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path):
    _train(tmp_path, "run", 30)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as handle:  # as if killed after logging iteration 40
        handle.write(json.dumps({"iteration": 40, "loss": 1.0}) + "\n")
    state = checkpoint.load(tmp_path / "run")
    state.pop("format"), state.pop("version")
    checkpoint.save(tmp_path / "run" / "checkpoint.pt", {**state, "iteration": 30})
    _train(tmp_path, "run", 50, resume=True)
    assert [r["iteration"] for r in S.read_metrics(metrics)] == [10, 20, 30, 40, 50]
    assert S.read_metrics(metrics)[3]["loss"] != 1.0


def test_a_fresh_run_in_an_old_directory_removes_the_old_checkpoint(tmp_path):
    _train(tmp_path, "run", 30)
    # A new run stopped before its first checkpoint (iteration 25): nothing of the old run is
    # left for --resume to continue beside the new run's log.
    with pytest.raises(KeyboardInterrupt):
        with mock.patch.object(S, "meta_loss", side_effect=KeyboardInterrupt):
            _train(tmp_path, "run", 30)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert S.read_metrics(tmp_path / "run" / "metrics.jsonl") == []


# evaluation --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def briefly_trained():
    torch.manual_seed(0)
    config = S.make_config({})
    _, wrapper = S.build(config)
    optimizer = torch.optim.Adam(wrapper.parameters(), lr=1e-3)
    sampler = fastmeta.data.Sinusoid(10, 10, seed=0)
    for _ in range(500):
        loss = S.meta_loss(wrapper, sampler.sample(25))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return wrapper


def test_evaluate_numbers_are_sane(briefly_trained, tmp_path):
    results = S.evaluate(briefly_trained, num_tasks=60, baseline_steps=200, validation_tasks=40,
                         plot_path=tmp_path / "adaptation.png")
    table = results["algorithm_results"]
    for k in ("10", "20"):
        assert table[k]["10"]["mse"] < table[k]["0"]["mse"]
    for k in ("5", "10", "20"):
        assert table[k]["1"]["mse"] < table[k]["0"]["mse"]
        assert all(0 < cell["mse"] < 50 and 0 < cell["ci95"] < cell["mse"] for cell in table[k].values())
    # 0 steps does not look at the support set: the same for every K.
    assert table["5"]["0"] == table["10"]["0"] == table["20"]["0"]
    # More support points help after 10 steps.
    assert table["20"]["10"]["mse"] < table["5"]["10"]["mse"]
    baseline = results["baseline"]
    assert baseline["lr_grid"] == [0.001, 0.003, 0.01, 0.03, 0.1]
    for k in ("5", "10", "20"):
        assert set(baseline["chosen_lr"][k]) == {"1", "10"}
        assert all(lr in baseline["lr_grid"] for lr in baseline["chosen_lr"][k].values())
        assert baseline["results"][k]["10"]["mse"] <= baseline["results"][k]["0"]["mse"] * 1.05
    assert (tmp_path / "adaptation.png").stat().st_size > 10_000
    text = S.format_table(results)
    assert "pretrained + fine-tuned" in text and "K=20" in text and "±" in text


def test_evaluate_is_deterministic_and_leaves_rng_alone(briefly_trained):
    rng = torch.get_rng_state()
    a = S.evaluate(briefly_trained, num_tasks=20, baseline_steps=20, validation_tasks=10)
    b = S.evaluate(briefly_trained, num_tasks=20, baseline_steps=20, validation_tasks=10)
    assert a == b
    assert torch.equal(rng, torch.get_rng_state())
    # A different test seed gives different tasks.
    c = S.evaluate(briefly_trained, num_tasks=20, seed=5, baseline=False)
    assert c["algorithm_results"] != a["algorithm_results"]


def test_evaluate_rejects_bad_arguments(briefly_trained):
    with pytest.raises(ValueError, match="num_tasks"):
        S.evaluate(briefly_trained, num_tasks=0)
    with pytest.raises(ValueError, match="shots"):
        S.evaluate(briefly_trained, num_tasks=5, shots=(0,), baseline=False)


def test_finetune_reduces_support_loss_and_tolerates_divergence():
    torch.manual_seed(1)
    model = fastmeta.models.mlp([1, 40, 40, 1])
    tasks = fastmeta.data.Sinusoid(10, 10, seed=3).sample(8)
    before = S.per_task_loss("mse", S.finetune(model, tasks.support_x, tasks.support_y, 0.01, 0)(
        tasks.support_x), tasks.support_y)
    after = S.per_task_loss("mse", S.finetune(model, tasks.support_x, tasks.support_y, 0.01, 10)(
        tasks.support_x), tasks.support_y)
    assert float(after.mean()) < float(before.mean())
    with torch.no_grad():
        diverged = S.finetune(model, tasks.support_x, tasks.support_y, 1e6, 10)(tasks.query_x)
    assert diverged.shape == tasks.query_y.shape  # no exception


# checkpoints -------------------------------------------------------------------------------------
def test_checkpoint_save_load_roundtrip(tmp_path):
    path = tmp_path / "sub" / "checkpoint.pt"
    checkpoint.save(path, {"iteration": 3, "weights": torch.arange(4.0)})
    state = checkpoint.load(path)
    assert state["iteration"] == 3 and torch.equal(state["weights"], torch.arange(4.0))
    assert checkpoint.load(path.parent)["iteration"] == 3  # a run directory works too
    assert os.listdir(path.parent) == ["checkpoint.pt"]  # no temporary file left behind
    checkpoint.save(path, {"iteration": 4})  # overwrites atomically
    assert checkpoint.load(path)["iteration"] == 4


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    checkpoint.save(corrupt, {"iteration": 1})
    corrupt.write_bytes(corrupt.read_bytes()[:50])  # truncated
    with pytest.raises(checkpoint.CheckpointError, match="not a readable fastmeta checkpoint"):
        checkpoint.load(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save([1, 2, 3], foreign)
    with pytest.raises(checkpoint.CheckpointError, match="not a fastmeta checkpoint"):
        checkpoint.load(foreign)
    assert issubclass(checkpoint.CheckpointError, ValueError)
    with pytest.raises(TypeError):
        checkpoint.save(tmp_path / "x.pt", [1, 2])


def test_diverging_adaptation_is_reported_not_raised(tmp_path):
    torch.manual_seed(0)
    _, wrapper = S.build(S.make_config({"algorithm": "metasgd", "inner_lr": 5.0}))
    results = S.evaluate(wrapper, num_tasks=10, baseline=False, plot_path=tmp_path / "a.png")
    cell = results["algorithm_results"]["10"]["10"]
    assert cell["diverged"] > 0
    assert cell["mse"] is None or (cell["diverged"] < 10 and math.isfinite(cell["mse"]))
    assert results["algorithm_results"]["10"]["0"].get("diverged") is None
    S.write_results(tmp_path / "results.json", results)
    reloaded = json.loads((tmp_path / "results.json").read_text())  # strict JSON
    assert reloaded["algorithm_results"]["10"]["10"]["diverged"] == cell["diverged"]
    table = S.format_table(reloaded)
    assert "div.)" in table or "all diverged" in table
    # Some tasks diverge, the others are averaged.
    per_task = {5: {1: torch.tensor([1.0, 3.0, math.inf])}}
    assert S._summarise(per_task)["5"]["1"] == {"mse": 2.0, "ci95": mean_ci([1.0, 3.0])[1],
                                                "diverged": 1}
    assert (tmp_path / "a.png").is_file()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal(tmp_path):
    config = S.make_config({"iterations": 60, "log_every": 20, "output": str(tmp_path / "run")})
    terminal = _Terminal()
    S.train(config, evaluate_after=False, stream=terminal)
    text = terminal.getvalue()
    assert "meta-training" in text and "60/60" in text and "tasks/s" in text and "loss=" in text


def test_resume_from_an_incomplete_checkpoint_is_a_clear_error(tmp_path):
    state = _train(tmp_path, "run", 10)
    state.pop("format"), state.pop("version"), state.pop("optimizer")
    checkpoint.save(tmp_path / "run" / "checkpoint.pt", state)
    with pytest.raises(checkpoint.CheckpointError, match="cannot resume"):
        _train(tmp_path, "run", 20, resume=True)
