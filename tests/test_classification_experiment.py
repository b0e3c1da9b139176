"""The few-shot classification experiment (``fastmeta train digits|omniglot|folder``): tiny
runs of every algorithm writing checkpoint, metrics, results and plots; ``eval`` of a
checkpoint; exact resume, also after ``kill -9``; the command line's one-line errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastmeta import checkpoint
from cli_helpers import assert_one_line_error, run_cli
from fastmeta.experiments import EXPERIMENTS, get
from fastmeta.experiments import classification as C
from fastmeta.experiments.training import read_metrics

# A tiny run: MLP on the compiled engine (where the algorithm takes one), few iterations,
# few evaluation tasks, a short pretraining and fine-tuning for the baselines.
TINY = ["--iterations", "6", "--meta-batch", "2", "--eval-tasks", "8", "--val-tasks", "4",
        "--val-every", "3", "--log-every", "2", "--checkpoint-every", "3",
        "--baseline-steps", "5", "--finetune-steps", "2", "--queries", "3",
        "--eval-queries", "3", "--quiet"]


# Configuration ----------------------------------------------------------------------------------
def test_registry_and_defaults():
    from fastmeta.experiments import DEFAULT_DATASET

    assert DEFAULT_DATASET == "digits"
    assert all(get(name) is C for name in ("digits", "omniglot", "folder"))
    assert EXPERIMENTS["sinusoid"] == "fastmeta.experiments.sinusoid"
    config = C.make_config({})
    assert config["dataset"] == "digits" and config["algorithm"] == "maml"
    assert config["ways"] == 5 and config["shots"] == 1 and config["eval_tasks"] == 600
    assert config["output"] == os.path.join("runs", "digits-maml")
    assert config["model"] == "conv" and config["augment"] == "flip"
    splits = C.load_splits(config)
    assert (splits.train.num_classes, splits.val.num_classes, splits.test.num_classes) == (32, 8, 16)
    names = set(splits.train.class_names) | set(splits.val.class_names)
    assert len(names) == 40 and not names & set(splits.test.class_names)
    assert not {n.split("/")[0] for n in splits.val.class_names} & {
        n.split("/")[0] for n in splits.train.class_names}     # whole digits held out
    assert C.make_config({"algorithm": "reptile"})["inner_steps"] == 5
    omniglot = C.make_config({"dataset": "omniglot", "algorithm": "protonet", "data": "x"})
    assert omniglot["train_ways"] == 60 and omniglot["ways"] == 5 and omniglot["data"] == "x"
    assert omniglot["image_size"] == 28
    with pytest.raises(ValueError, match="train-ways"):
        C.make_config({"train_ways": 10})             # MAML's head is N-way
    with pytest.raises(ValueError, match="algorithm"):
        C.make_config({"algorithm": "nope"})
    with pytest.raises(ValueError, match="--ways must be at least 2"):
        C.make_config({"ways": 1})


@pytest.mark.parametrize("algorithm", C.ALGORITHMS)
def test_build_and_one_meta_step(algorithm):
    config = C.make_config({"algorithm": algorithm, "model": "mlp", "meta_batch": 2})
    splits = C.load_splits(config)
    network, learner = C.build(config, splits.train.image_shape)
    assert {id(p) for p in network.parameters()} <= {id(p) for p in learner.parameters()}
    tasks = C.TaskSampler(splits.train, 5, 1, 3, 2, seed=0).sample()
    loss = C.meta_step_loss(learner, tasks)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())
    scores = C.predict(learner, tasks.support_x, tasks.support_y, tasks.query_x, 1)
    assert scores.shape == (2, 15, 5)
    if algorithm in ("maml", "fomaml", "metasgd", "anil", "reptile"):
        assert learner.last_backend == "cpu"   # the compiled MLP engine serves the digits MLP


# Tiny end-to-end runs -----------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm, model", [
    ("maml", "mlp"), ("fomaml", "mlp"), ("reptile", "mlp"), ("metasgd", "mlp"),
    ("anil", "mlp"), ("protonet", "mlp"), ("relationnet", "conv"), ("maml", "conv")])
def test_tiny_run_writes_everything(tmp_path, capsys, algorithm, model):
    output = tmp_path / "run"
    code, out, err = run_cli(["train", "digits", "--algorithm", algorithm, "--model", model,
                              *TINY, "--output", str(output)], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    for name in ("checkpoint.pt", "metrics.jsonl", "results.json", "test_task.png",
                 "learning_curve.png", "baseline.pt"):
        assert (output / name).is_file(), name
    assert not [p for p in output.iterdir() if p.name.endswith(".tmp")]
    # The table: the meta-learner and both baselines, with CIs.
    assert f"{algorithm} (meta-learned)" in out
    assert "from scratch on the support set" in out and "pretrained on the 32 training" in out
    # the header, three methods, and the meta-learner minus each baseline paired over the tasks
    assert out.count("±") == 6 and f"{algorithm} − this (paired, same tasks)" in out

    records = read_metrics(output / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [2, 3, 4, 6]
    train_lines = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in train_lines] == [2, 4, 6]
    assert all(r["loss"] > 0 and r["tasks_per_second"] > 0 for r in train_lines)
    assert all(0 <= r["accuracy"] <= 1 for r in train_lines)
    assert [r["iteration"] for r in records if "val_accuracy" in r] == [3, 6]

    results = json.loads((output / "results.json").read_text())
    assert results["algorithm"] == algorithm and results["iterations"] == 6
    assert results["eval_tasks"] == 8 and results["ways"] == 5 and results["shots"] == 1
    for method in ("meta", "scratch", "pretrained"):
        cell = results["accuracy"][method]
        assert 0 <= cell["mean"] <= 1 and cell["ci95"] >= 0
    meta = results["accuracy"]["meta"]["mean"]
    for method in ("scratch", "pretrained"):  # paired over the same tasks: means subtract
        cell = results["accuracy"][method]
        assert cell["meta_minus_this"]["mean"] == pytest.approx(meta - cell["mean"], abs=1e-12)
        assert cell["meta_minus_this"]["ci95"] >= 0
    state = checkpoint.load(output)
    assert state["iteration"] == 6 and state["config"]["algorithm"] == algorithm
    for key in ("model", "algorithm", "optimizer", "sampler", "torch_rng"):
        assert key in state


def test_eval_of_a_checkpoint(tmp_path, capsys):
    output = tmp_path / "run"
    code, _, err = run_cli(["train", "--algorithm", "protonet", "--model", "mlp", *TINY,
                            "--no-eval", "--output", str(output)], capsys)
    assert code == 0, err
    assert not (output / "results.json").exists()
    code, out, err = run_cli(["eval", str(output), "--eval-tasks", "5",
                              "--output", str(tmp_path / "eval")], capsys)
    assert code == 0, err
    assert "protonet (meta-learned)" in out and out.count("±") == 6
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["eval_tasks"] == 5 and results["iterations"] == 6
    assert (tmp_path / "eval" / "test_task.png").is_file()
    assert (tmp_path / "eval" / "learning_curve.png").is_file()
    # The same test tasks and baselines: eval is deterministic.
    code, out2, err = run_cli(["eval", str(output), "--eval-tasks", "5",
                               "--output", str(tmp_path / "eval2")], capsys)
    assert code == 0 and out2 == out.replace(str(tmp_path / "eval"), str(tmp_path / "eval2"))


def test_finetune_scores_at_several_budgets_equal_separate_runs():
    config = C.make_config({"model": "mlp"})
    assert config["finetune_steps"] is None      # by default chosen on validation tasks
    splits = C.load_splits(config)
    tasks = C.TaskSampler(splits.test, 5, 1, 3, 3, seed=0).sample()
    torch.manual_seed(0)
    model = C.baseline_network(config, splits.train.image_shape, 5)
    for head_only in (False, True):
        at = C.finetune_scores_at(model, tasks.support_x, tasks.support_y, tasks.query_x, 0.01,
                                  (0, 2, 5), head_only)
        assert sorted(at) == [0, 2, 5]
        for steps in (2, 5):
            alone = C.finetune_scores(model, tasks.support_x, tasks.support_y, tasks.query_x,
                                      0.01, steps, head_only)
            assert torch.equal(at[steps], alone)
        assert not torch.equal(at[0], at[5])


def test_baselines_budget_chosen_on_validation_tasks(tmp_path, capsys, monkeypatch):
    """Without --finetune-steps the baselines' number of steps is chosen from the grid (a
    small one here) and the table says how many each got."""
    monkeypatch.setattr(C, "FINETUNE_STEP_GRID", (1, 3))
    argv = ["train", "--model", "mlp", *TINY, "--output", str(tmp_path / "run")]
    at = argv.index("--finetune-steps")
    del argv[at:at + 2]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["finetune_steps"] is None
    assert results["baseline"]["steps_grid"] == [1, 3]
    assert "steps from {1, 3} and step size from" in out
    for name in ("scratch", "pretrained"):
        steps = results["accuracy"][name]["steps"]
        assert steps in (1, 3)
        assert f"Adam step{'s' if steps > 1 else ''}  " in out   # in the baseline's row


def test_progress_line_shows_loss_accuracy_and_rate(tmp_path, capsys):
    argv = ["train", "--model", "mlp", *[a for a in TINY if a != "--quiet"], "--no-eval",
            "--output", str(tmp_path / "run")]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    line = [l for l in err.splitlines() if "iteration 6/6" in l][0]
    assert "loss" in line and "accuracy" in line and "val_accuracy" in line and "tasks/s" in line
    assert all(l.startswith("fastmeta: ") for l in err.strip().splitlines()), err


# Resume -------------------------------------------------------------------------------------------
def _config(tmp_path, name, iterations, **extra):
    options = {"model": "mlp", "iterations": iterations, "meta_batch": 4, "queries": 5,
               "eval_queries": 5, "log_every": 5, "checkpoint_every": 10, "val_every": 10,
               "val_tasks": 4, "output": str(tmp_path / name), **extra}
    return C.make_config(options)


def _assert_same_run(a_dir, b_dir):
    a, b = checkpoint.load(a_dir), checkpoint.load(b_dir)
    assert a["iteration"] == b["iteration"]
    assert a["algorithm"].keys() == b["algorithm"].keys()
    for key, value in a["algorithm"].items():
        assert torch.equal(value, b["algorithm"][key]), key
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["exp_avg"], y["exp_avg"]) and torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])
    assert torch.equal(a["sampler"]["rng"], b["sampler"]["rng"])
    logs = [[(r["iteration"], r["loss"], r.get("accuracy")) for r in read_metrics(d / "metrics.jsonl")
             if "loss" in r] for d in (a_dir, b_dir)]
    assert logs[0] == logs[1]


@pytest.mark.parametrize("algorithm, extra", [("maml", {}), ("protonet", {"lr_halve_every": 7})])
def test_resume_is_bit_identical(tmp_path, algorithm, extra):
    C.train(_config(tmp_path, "straight", 30, algorithm=algorithm, **extra), quiet=True,
            evaluate_after=False)
    C.train(_config(tmp_path, "resumed", 20, algorithm=algorithm, **extra), quiet=True,
            evaluate_after=False)
    C.train(_config(tmp_path, "resumed", 30, algorithm=algorithm, **extra), resume=True,
            quiet=True, evaluate_after=False, explicit=["iterations"])
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    if extra:
        state = checkpoint.load(tmp_path / "resumed")
        assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 / 2 ** 4)


def _environment():
    env = dict(os.environ)
    env.pop("FASTMETA_DEBUG", None)
    return env


def test_kill_9_then_resume_gives_the_same_weights(tmp_path):
    """A run killed with SIGKILL mid-training, resumed with --resume, ends with the same
    weights, optimizer and sampler state as an uninterrupted run."""
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "fastmeta", "train", "digits", "--model", "mlp",
               "--iterations", "100000", "--meta-batch", "4", "--queries", "5",
               "--eval-queries", "5", "--log-every", "5", "--checkpoint-every", "10",
               "--val-every", "10", "--val-tasks", "4", "--no-eval", "--quiet",
               "--output", str(killed)]
    process = subprocess.Popen(command, env=_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"the run ended early: {process.stderr.read().decode()}")
            try:
                if checkpoint.load(killed)["iteration"] >= 20:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        else:
            pytest.fail("no checkpoint past iteration 20 within 90 s")
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    at = checkpoint.load(killed)["iteration"]
    assert at >= 20 and at % 10 == 0
    final = at + 15
    C.train(_config(tmp_path, "killed", final), resume=True, quiet=True, evaluate_after=False,
            explicit=["iterations"])
    C.train(_config(tmp_path, "straight", final), quiet=True, evaluate_after=False)
    _assert_same_run(tmp_path / "straight", killed)


def test_resume_refuses_a_changed_run_option(tmp_path, capsys):
    output = tmp_path / "run"
    code, _, err = run_cli(["train", "--model", "mlp", *TINY, "--no-eval", "-o", str(output)],
                           capsys)
    assert code == 0, err
    assert_one_line_error(*run_cli(["train", *TINY, "--no-eval", "-o", str(output), "--resume",
                                    "--shots", "2"], capsys), "--shots")
    # Without a dataset, --resume continues the checkpoint's (digits here), further.
    code, _, err = run_cli(["train", "--iterations", "8", "--no-eval", "-q", "-o", str(output),
                            "--resume"], capsys)
    assert code == 0, err
    state = checkpoint.load(output)
    assert state["iteration"] == 8 and state["config"]["model"] == "mlp"
    assert state["config"]["queries"] == 3      # the run's, not the default
    # A plain --resume finishes the run as started: here it is complete, nothing to do.
    code, _, err = run_cli(["train", "--no-eval", "-q", "-o", str(output), "--resume"], capsys)
    assert code == 0, err
    assert checkpoint.load(output)["iteration"] == 8


# Command-line errors: exit status 2, one line, no traceback ------------------------------------
@pytest.mark.parametrize("argv, fragments", [
    (["train", "--ways", "17"], ["--ways 17", "16 test classes"]),
    (["train", "--ways", "9"], ["--ways 9", "8 validation classes"]),
    (["train", "--shots", "100", "--queries", "100"], ["--shots 100", "--queries 100", "images"]),
    (["train", "--eval-queries", "200"], ["--eval-queries 200", "images"]),
    (["train", "--ways", "1"], ["--ways"]),
    (["train", "--algorithm", "protonets"], ["--algorithm", "protonets"]),
    (["train", "--algorithm", "maml", "--train-ways", "20"], ["--train-ways"]),
    (["train", "sinusoid", "--algorithm", "protonet"], ["--algorithm", "protonet", "sinusoid"]),
    (["train", "sinusoid", "--ways", "5"], ["--ways", "sinusoid"]),
    (["train", "--image-size", "16"], ["--image-size", "digits"]),
    (["train", "--model", "resnet"], ["--model"]),
])
def test_bad_arguments(argv, fragments, capsys):
    assert_one_line_error(*run_cli(argv, capsys), *fragments)


def test_omniglot_without_data_path(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FASTMETA_DATA", raising=False)
    argv = ["train", "omniglot", "-o", str(tmp_path / "run")]
    assert_one_line_error(*run_cli(argv, capsys), "omniglot", "--data", "FASTMETA_DATA")
    missing = tmp_path / "no-such-folder"
    assert_one_line_error(*run_cli(argv + ["--data", str(missing)], capsys),
                          str(missing), "does not exist", "images_background.zip")
    monkeypatch.setenv("FASTMETA_DATA", str(missing))
    assert_one_line_error(*run_cli(argv, capsys), str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(*run_cli(argv + ["--data", str(empty)], capsys), str(empty),
                          "images_background.zip")
    assert_one_line_error(*run_cli(["train", "folder", "--data", str(empty), "-o",
                                    str(tmp_path / "r")], capsys), str(empty))


def test_folder_dataset_end_to_end(tmp_path, capsys, monkeypatch):
    """A user's folder of class sub-folders: split into training, validation and test
    classes, trained and evaluated."""
    from PIL import Image

    monkeypatch.setenv("FASTMETA_CACHE", str(tmp_path / "cache"))

    generator = torch.Generator().manual_seed(0)
    root = tmp_path / "letters"
    for c in range(15):
        (root / f"class{c}").mkdir(parents=True)
        pattern = torch.rand(12, 12, generator=generator) > 0.5
        for i in range(6):
            noisy = pattern ^ (torch.rand(12, 12, generator=generator) > 0.9)
            Image.fromarray((noisy.numpy() * 255).astype("uint8")).save(root / f"class{c}" / f"{i}.png")
    output = tmp_path / "run"
    code, out, err = run_cli(["train", "folder", "--data", str(root), "--image-size", "16",
                              "--algorithm", "protonet", "--ways", "2", *TINY, "-o", str(output)],
                             capsys)
    assert code == 0, err
    assert "protonet (meta-learned)" in out and (output / "test_task.png").is_file()
    # More ways than the folder's test classes: a clear error.
    assert_one_line_error(*run_cli(["train", "folder", "--data", str(root), "--ways", "5",
                                    *TINY, "-o", str(output)], capsys), "--ways 5", "test classes")


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.path.dirname(__file__), "..", "..",
                                                   "shared", "data", "omniglot")),
                    reason="the real Omniglot data is not at ../shared/data/omniglot")
def test_real_omniglot_protonet_tiny_run(tmp_path, capsys):
    data = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "omniglot")
    code, out, err = run_cli(["train", "omniglot", "--data", data, "--algorithm", "protonet",
                              "--model", "mlp", "--train-ways", "5", *TINY, "--eval-tasks", "2",
                              "--val-tasks", "2", "-o", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert "pretrained on the 4400 training classes" in out


def test_conv_network_needs_images_of_at_least_two_pixels():
    from fastmeta.experiments import classification

    with pytest.raises(ValueError, match="--image-size must be at least 2 for the conv network"):
        classification.make_config({"dataset": "folder", "image_size": 1, "data": "x"})
    assert classification.make_config({"dataset": "folder", "image_size": 1, "model": "mlp",
                                       "data": "x"})["image_size"] == 1


def test_a_saved_run_whose_data_is_gone_takes_fastmeta_data(tmp_path, monkeypatch):
    """The missing-data message says "pass --data PATH or set FASTMETA_DATA": both must work
    for --resume and fastmeta eval, whose runs remember their data path."""
    from fastmeta.experiments import classification

    config = {"dataset": "folder", "data": str(tmp_path / "moved-away")}
    monkeypatch.delenv(classification.ENV, raising=False)
    classification._data_from_environment(config)
    assert config["data"] == str(tmp_path / "moved-away")
    monkeypatch.setenv(classification.ENV, str(tmp_path))
    classification._data_from_environment(config)
    assert config["data"] == str(tmp_path)
    present = {"dataset": "folder", "data": str(tmp_path)}
    monkeypatch.setenv(classification.ENV, "/elsewhere")
    classification._data_from_environment(present)          # a path that exists is kept
    assert present["data"] == str(tmp_path)


def test_a_data_path_that_is_not_a_path_is_refused():
    """A tampered checkpoint's data entry is named by check_saved_run, which calls this."""
    from fastmeta.experiments import classification

    with pytest.raises(ValueError, match="--data must be a path, got 12"):
        classification.make_config({"dataset": "folder", "data": 12})
