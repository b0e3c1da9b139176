"""The ``fastmeta`` command line: one-line errors with exit status 2, a tiny end-to-end run,
``eval`` of its checkpoint, ``--resume`` checks, and the console entry points."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastmeta import checkpoint
from cli_helpers import assert_one_line_error, run_cli

TINY = ["--iterations", "20", "--eval-tasks", "20", "--baseline-steps", "30", "--log-every", "5",
        "--checkpoint-every", "10", "--quiet"]


@pytest.mark.parametrize("argv, fragments", [
    (["train", "--shots", "0"], ["--shots", "positive integer"]),
    (["train", "sinusoid", "--shots", "-5"], ["--shots", "-5"]),
    (["train", "--shots", "ten"], ["--shots"]),
    (["train", "sinusoid", "--algorithm", "protonet"], ["--algorithm", "protonet", "sinusoid"]),
    (["train", "--algorithm", "bogus"], ["--algorithm", "bogus"]),
    (["train", "--iterations", "0"], ["--iterations"]),
    (["train", "--inner-lr", "-0.1"], ["--inner-lr"]),
    (["train", "--meta-batch", "0"], ["--meta-batch"]),
    (["train", "omniglot-typo"], ["dataset", "sinusoid"]),
    (["train", "--device", "tpu:0"], ["--device"]),
    (["train", "--no-such-option"], ["--no-such-option"]),
    ([], ["COMMAND"]),
    (["fit"], ["fit"]),
    (["eval"], ["checkpoint"]),
    (["train", "--seed", str(2 ** 64)], ["--seed", "2^63"]),
    (["train", "--threads", "100000"], ["--threads"]),
    (["train", "--outer-lr", "1e39"], ["--outer-lr"]),
    (["train", "--output", ""], ["--output", "empty"]),
    (["train", "folder", "--image-size", "100000"], ["--image-size"]),
    (["train", "--data", "/some/where"], ["--data", "does not apply to digits"]),
    (["train", "--eval-tasks", "99999999999", "--no-eval"], ["--eval-tasks", "GiB", "use fewer"]),
    (["train", "--meta-batch", "100000000"], ["--meta-batch", "GiB"]),
])
def test_bad_arguments_give_one_line_and_status_2(argv, fragments, capsys):
    assert_one_line_error(*run_cli(argv, capsys), *fragments)


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert_one_line_error(*run_cli(["eval", str(missing)], capsys), "no checkpoint", "nope.pt")
    # A run directory without a checkpoint names the file it looked for.
    assert_one_line_error(*run_cli(["eval", str(tmp_path)], capsys), "checkpoint.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n" * 10, b"PK\x03\x04garbage"])
def test_corrupt_checkpoint(tmp_path, content, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    assert_one_line_error(*run_cli(["eval", str(path)], capsys), "not a readable fastmeta checkpoint")


def test_foreign_torch_file_is_rejected(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    assert_one_line_error(*run_cli(["eval", str(path)], capsys), "not a fastmeta checkpoint")


def test_resume_without_checkpoint(tmp_path, capsys):
    argv = ["train", *TINY, "--output", str(tmp_path / "run"), "--resume"]
    assert_one_line_error(*run_cli(argv, capsys), "no checkpoint")


def test_library_errors_are_one_line(tmp_path, capsys):
    # No CUDA kernels in a CPU run: naming backend cuda is the library's ValueError.
    argv = ["train", *TINY, "--backend", "cuda", "--output", str(tmp_path / "run")]
    code, out, err = run_cli(argv, capsys)
    if code == 0:
        pytest.skip("this build runs backend cuda")
    assert_one_line_error(code, out, err, "backend")


def test_tiny_training_run_writes_everything(tmp_path, capsys):
    output = tmp_path / "run"
    code, out, err = run_cli(["train", "sinusoid", *TINY, "--output", str(output)], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    for name in ("checkpoint.pt", "metrics.jsonl", "results.json", "sinusoid_adaptation.png",
                 "learning_curve.png"):
        assert (output / name).is_file(), name
    assert not [p for p in output.iterdir() if p.name.endswith(".tmp")]
    # The table: both methods, every K, and the baseline's step-size note.
    assert "K=5" in out and "K=10" in out and "K=20" in out
    assert "maml" in out and "pretrained + fine-tuned" in out and "validation tasks" in out

    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [5, 10, 15, 20]
    assert all(m["loss"] > 0 and m["tasks_per_second"] > 0 for m in metrics)

    results = json.loads((output / "results.json").read_text())
    assert results["algorithm"] == "maml" and results["iterations"] == 20
    assert results["eval_tasks"] == 20
    for table in (results["algorithm_results"], results["baseline"]["results"]):
        assert set(table) == {"5", "10", "20"}
        assert all(set(by_k) == {"0", "1", "10"} for by_k in table.values())
        assert all(cell["mse"] > 0 and cell["ci95"] > 0 for by_k in table.values()
                   for cell in by_k.values())

    state = checkpoint.load(output / "checkpoint.pt")
    assert state["iteration"] == 20
    assert state["config"]["shots"] == 10 and state["config"]["algorithm"] == "maml"
    for key in ("model", "algorithm", "optimizer", "sampler", "torch_rng"):
        assert key in state

    # eval of the checkpoint (by its run directory), into another directory.
    code, out, err = run_cli(["eval", str(output), "--eval-tasks", "10", "--baseline-steps", "20",
                              "--output", str(tmp_path / "eval")], capsys)
    assert code == 0, err
    assert "K=10" in out
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["eval_tasks"] == 10 and evaluated["iterations"] == 20
    assert (tmp_path / "eval" / "sinusoid_adaptation.png").is_file()
    assert (tmp_path / "eval" / "learning_curve.png").is_file()

    # Resuming with a different run option is refused; a longer --iterations continues.
    code, out, err = run_cli(["train", *TINY, "--output", str(output), "--resume",
                              "--shots", "5"], capsys)
    assert_one_line_error(code, out, err, "--shots")
    code, out, err = run_cli(["train", *TINY[2:], "--iterations", "30", "--output", str(output),
                              "--resume"], capsys)
    assert code == 0, err
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [5, 10, 15, 20, 25, 30]
    assert checkpoint.load(output)["iteration"] == 30


def test_progress_lines_when_not_quiet(tmp_path, capsys):
    output = tmp_path / "run"
    argv = ["train", "--algorithm", "reptile", "--iterations", "10", "--no-eval",
            "--output", str(output)]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "iteration 10/10" in err and "trained 10 iterations" in err
    assert all(line.startswith("fastmeta: ") for line in err.strip().splitlines()), err
    assert out == "" and not (output / "results.json").exists()
    assert checkpoint.load(output)["config"]["inner_steps"] == 5  # reptile's default


def _environment():
    env = dict(os.environ)
    env.pop("FASTMETA_DEBUG", None)
    return env


def test_console_script(tmp_path):
    script = shutil.which("fastmeta")
    command = [script] if script is not None else [sys.executable, "-m", "fastmeta"]
    done = subprocess.run(command + ["train", "--shots", "0"], capture_output=True, text=True,
                          env=_environment(), timeout=120)
    assert done.returncode == 2, (command, done.stderr)
    assert done.stderr.strip().splitlines() == [
        "fastmeta: error: argument --shots/-k: must be a positive integer, got 0"]
    assert done.stdout == ""


def test_module_entry_calls_main():
    import runpy
    from unittest import mock

    with mock.patch("fastmeta.cli.main", return_value=0) as main_, \
            pytest.raises(SystemExit) as exit_:
        runpy.run_module("fastmeta", run_name="__main__")
    assert exit_.value.code == 0 and main_.called


def test_help_exits_0(capsys):
    code, out, err = run_cli(["train", "--help"], capsys)
    assert code == 0 and "--algorithm" in out and "--resume" in out and err == ""


# Damaged or mismatched run directories (cases a fuzzing pass of the CLI found) --------------
SINUSOID_TINY = ["--iterations", "2", "--meta-batch", "2", "--no-eval", "--quiet"]


@pytest.fixture
def sinusoid_run(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "sinusoid", *SINUSOID_TINY, "--output", str(run)], capsys)
    assert code == 0, err
    return run


def test_resume_names_a_dataset_other_than_the_runs(sinusoid_run, capsys):
    argv = ["train", "digits", "--resume", "--output", str(sinusoid_run), "--no-eval"]
    assert_one_line_error(*run_cli(argv, capsys), "is a sinusoid run, not digits")


@pytest.mark.parametrize("tamper, words", [
    (lambda state: state["config"].pop("seed"), "lacks seed"),
    (lambda state: state["config"].update(meta_batch="two"), "bad run configuration"),
    (lambda state: state.update(iteration=-5), "bad iteration count -5"),
    (lambda state: state.update(elapsed="abc"), "bad training time 'abc'"),
    (lambda state: state.update(algorithm=[1, 2]), "holds no learner weights"),
])
def test_tampered_checkpoint_is_named(sinusoid_run, tamper, words, capsys):
    path = sinusoid_run / "checkpoint.pt"
    state = checkpoint.load(path)
    tamper(state)
    torch.save(state, path)
    for argv in (["eval", str(sinusoid_run)],
                 ["train", "sinusoid", "--resume", "--output", str(sinusoid_run), "--no-eval"]):
        assert_one_line_error(*run_cli(argv, capsys), str(path), words)


def test_a_run_on_a_device_this_torch_lacks_says_so(sinusoid_run, capsys):
    path = sinusoid_run / "checkpoint.pt"
    state = checkpoint.load(path)
    device = "meta" if torch.cuda.is_available() else "cuda"   # (trained on a GPU box)
    state["config"]["device"] = device
    torch.save(state, path)
    assert_one_line_error(*run_cli(["eval", str(sinusoid_run)], capsys), "the run's device",
                          "--device cpu")
    code, _, err = run_cli(["eval", str(sinusoid_run), "--device", "cpu", "-o",
                            str(sinusoid_run / "on_cpu")], capsys)
    assert code == 0, err


@pytest.mark.parametrize("device", ["tpu", "meta", "not a device"] +
                         ([] if torch.cuda.is_available() else ["cuda"]))
def test_a_saved_device_this_torch_cannot_use_is_refused(device):
    from fastmeta.experiments import training

    with pytest.raises(ValueError, match="--device cpu"):
        training.check_device(device)


def test_metric_lines_that_are_not_records_are_skipped(sinusoid_run, capsys):
    with open(sinusoid_run / "metrics.jsonl", "ab") as log:
        log.write(b'[1, 2]\n5\n{"loss": 1.0}\n\xff\xfe\n')
    argv = ["train", "sinusoid", "--resume", "--iterations", "4", "--output", str(sinusoid_run),
            "--no-eval", "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    lines = (sinusoid_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [2, 4]


def test_unwritable_results_leave_no_temporary_file(sinusoid_run, tmp_path, capsys):
    out = tmp_path / "eval"
    (out / "results.json").mkdir(parents=True)
    code, _, err = run_cli(["eval", str(sinusoid_run), "--eval-tasks", "2", "--output", str(out)],
                           capsys)
    assert_one_line_error(code, "", err, "results.json")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
