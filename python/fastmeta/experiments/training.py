"""What the experiments share: the meta-training loop with its progress bar, metrics log,
atomic checkpoints and exact resume, plus results files and figures.

:class:`Run` owns a run directory (``checkpoint.pt``, ``metrics.jsonl``): it loads the
checkpoint of a resumed run and merges its configuration, restores the model, optimizer,
sampler(s) and RNG state, and runs the loop. An experiment supplies ``step(iteration)``, one
meta-update that returns the numbers to log (``{"loss": ..., "accuracy": ...}``), and
optionally ``validate(iteration)`` and extra per-log-line fields. Everything that decides
the weights is in the checkpoint, so a run resumed from it -- after a clean stop or a
``kill -9`` -- ends with the same weights, bit for bit, as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import torch

from fastmeta import checkpoint as ckpt

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"

#: options a resumed run may change (the others come from the checkpoint)
CHANGEABLE_ON_RESUME = ("iterations", "device", "eval_tasks", "baseline_steps", "output")


# Threads ------------------------------------------------------------------------------------
@contextlib.contextmanager
def single_thread():
    """Runs torch on one intra-op thread: the experiments' small networks gain little from
    more, and on a busy machine extra threads cost several times their worth in waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def single_threaded(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with single_thread():
            return function(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def threads(count: int | None):
    """Runs torch on ``count`` intra-op threads (None: leave as is)."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Progress -----------------------------------------------------------------------------------
def _format_postfix(values: dict[str, float]) -> dict[str, str]:
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        if key == "tasks/s":
            out[key] = f"{value:,.0f}"
        elif "acc" in key:
            out[key] = f"{value:.3f}"
        else:
            out[key] = f"{value:.4f}"
    return out


class Progress:
    """A tqdm bar on a terminal; otherwise a log line every ``interval`` seconds (and at the
    last iteration): ``fastmeta: iteration i/total  loss ...  acc ...  N tasks/s  eta Ss``."""

    def __init__(self, total: int, initial: int, quiet: bool, stream: TextIO,
                 interval: float = 15.0, desc: str = "meta-training"):
        self.total, self.quiet, self.stream = total, quiet, stream
        self.interval = interval
        self.bar = None
        self.last_line = time.monotonic()
        self.start = time.monotonic()
        self.start_iteration = initial
        if not quiet and hasattr(stream, "isatty") and stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, file=stream, unit="it",
                            dynamic_ncols=True, desc=desc, smoothing=0.05)

    def update(self, iteration: int, count: int, values: dict[str, float] | None,
               tasks_per_second: float | None) -> None:
        """``count`` more iterations done, up to ``iteration``; ``values`` (e.g. loss,
        accuracy, validation accuracy) and the rate are the latest logged ones."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(count)
            if values:
                self.bar.set_postfix(_format_postfix({**values, "tasks/s": tasks_per_second}),
                                     refresh=False)
            return
        now = time.monotonic()
        if values and (now - self.last_line >= self.interval or iteration == self.total):
            self.last_line = now
            done = iteration - self.start_iteration
            rate = done / max(now - self.start, 1e-9)
            eta = (self.total - iteration) / rate if rate > 0 else float("nan")
            shown = "  ".join(f"{k} {v}" for k, v in _format_postfix(values).items())
            print(f"fastmeta: iteration {iteration}/{self.total}  {shown}  "
                  f"{tasks_per_second:,.0f} tasks/s  eta {eta:.0f}s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Metrics and results files ------------------------------------------------------------------
def require_positive_int(config: dict[str, Any], key: str, prefix: str = "--") -> None:
    """Raises ValueError unless ``config[key]`` is a positive integer (names it ``prefix+key``)."""
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{prefix}{key.replace('_', '-')} must be a positive integer, got {value!r}")


def require_positive_number(config: dict[str, Any], key: str, prefix: str = "--") -> None:
    """Like :func:`require_positive_int` for a finite positive number; stores it as float."""
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{prefix}{key.replace('_', '-')} must be a positive number, got {value!r}")
    config[key] = float(value)


def check_device(device: str, what: str = "the run's device") -> None:
    """Raises ValueError unless this torch can use ``device`` (the --device option; a run
    trained on a GPU and resumed or evaluated on a machine without one needs --device cpu)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{what} {device!r} is not a torch device; pass --device cpu or "
                         f"cuda") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {device!r} needs CUDA, which is not available to this "
                         f"torch; pass --device cpu")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} {device!r} is neither cpu nor cuda; pass --device cpu")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics JSON-lines file ([] if absent): JSON objects with an integer
    "iteration"; other lines (half-written, edited, undecodable) are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    return [record for _, record in _metric_lines(path)]


def _metric_lines(path: Path):
    """(line, record) for each valid line of a metrics file (see read_metrics)."""
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration"), int):
            yield line, record


def rewrite_metrics(path: Path, up_to: int) -> None:
    """Drops metric lines past ``up_to`` (written after the checkpoint a run resumes from)
    and any line a killed run left half-written."""
    if not path.exists():
        return
    kept = [line for line, record in _metric_lines(path) if record["iteration"] <= up_to]
    ckpt.atomic_write(path, lambda h: h.write("".join(line + "\n" for line in kept).encode()))


def json_safe(value):
    """``value`` with non-finite floats as None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_results(path: str | os.PathLike, results: dict[str, Any]) -> None:
    """Writes ``results`` as indented strict JSON, atomically."""
    text = json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n"
    ckpt.atomic_write(Path(path), lambda h: h.write(text.encode()))


def figure(rows: int, cols: int, size: tuple[float, float]):
    """A matplotlib figure on the Agg canvas (no global backend change) and its axes grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def smoothed(values: Sequence[float], span: int) -> list[float]:
    """Centred moving average over ``span`` (odd) points, shrinking at the ends."""
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - span // 2), min(len(values), i + span // 2 + 1)
        out.append(sum(values[lo:hi]) / (hi - lo))
    return out


# Resume -------------------------------------------------------------------------------------
def check_saved_run(state: dict[str, Any], path, make_config) -> None:
    """A checkpoint's run configuration and iteration, checked as a new run's options are
    (``make_config``: the experiment's): a tampered or foreign one names its path."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise ckpt.CheckpointError(f"{path} holds no run configuration")
    try:
        expected = make_config({"dataset": saved.get("dataset"),
                                "algorithm": saved.get("algorithm")})
        missing = sorted(set(expected) - set(saved))
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
        make_config(dict(saved))
    except (ValueError, TypeError) as error:
        raise ckpt.CheckpointError(f"{path} holds a bad run configuration ({error})") from None
    iteration = state.get("iteration")
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ckpt.CheckpointError(f"{path} holds a bad iteration count {iteration!r}")
    elapsed = state.get("elapsed", 0.0)
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not (
            math.isfinite(elapsed) and elapsed >= 0):
        raise ckpt.CheckpointError(f"{path} holds a bad training time {elapsed!r}")
    if not isinstance(state.get("algorithm"), dict):
        raise ckpt.CheckpointError(f"{path} holds no learner weights (its 'algorithm' entry is "
                                   f"{type(state.get('algorithm')).__name__}, not a state dict)")


def merge_resumed(state: dict[str, Any], config: dict[str, Any], explicit: Sequence[str],
                  run_options: Sequence[str], dataset: str | Sequence[str],
                  changeable: Sequence[str] = CHANGEABLE_ON_RESUME,
                  keep_saved: bool = False) -> dict[str, Any]:
    """The checkpoint's run configuration, with the options that may change on resume
    (``changeable``) taken from ``config`` -- or, with ``keep_saved``, only those the user
    gave (``explicit``; the output directory always), so that a plain ``--resume`` finishes
    the run as it was started. An option in ``explicit`` and in ``run_options`` must agree
    with the checkpoint."""
    saved = state.get("config")
    datasets = (dataset,) if isinstance(dataset, str) else tuple(dataset)
    if not isinstance(saved, dict) or saved.get("dataset") not in datasets:
        raise ckpt.CheckpointError(f"the checkpoint in {config['output']} is not from a "
                                   f"{' or '.join(datasets)} run")
    for key in run_options:
        if key in explicit and config.get(key) != saved.get(key):
            raise ValueError(f"--resume: --{key.replace('_', '-')} {config.get(key)} differs "
                             f"from the checkpoint's {saved.get(key)}")
    merged = dict(saved)
    for key in changeable:
        if key in config and (not keep_saved or key in explicit or key == "output"
                              or key not in saved):
            merged[key] = config[key]
    return merged


class Run:
    """One training run's directory, checkpoint and loop.

    ``Run(config, ...)`` loads ``<output>/checkpoint.pt`` when ``resume`` (its merged
    configuration is ``run.config``); :meth:`attach` creates the directory, names the objects whose state the
    checkpoint holds and restores them (or, for a fresh run, clears the old metrics);
    :meth:`train` runs the loop up to ``config["iterations"]``.
    """

    def __init__(self, config: dict[str, Any], *, dataset: str | Sequence[str],
                 run_options: Sequence[str], resume: bool = False, quiet: bool = False,
                 explicit: Sequence[str] = (), stream: TextIO | None = None,
                 changeable: Sequence[str] = CHANGEABLE_ON_RESUME, keep_saved: bool = False):
        self.stream = sys.stderr if stream is None else stream
        self.quiet = quiet
        self.output = Path(config["output"])
        self.checkpoint_path = self.output / ckpt.FILENAME
        self.metrics_path = self.output / METRICS_FILE
        self.state: dict[str, Any] | None = None
        if resume:
            self.state = ckpt.load(self.checkpoint_path)
            config = merge_resumed(self.state, config, explicit, run_options, dataset, changeable,
                                   keep_saved)
        check_device(config["device"])
        self.config = config
        self.start, self.elapsed = 0, 0.0
        self.window: dict[str, float] = {}
        self.objects: dict[str, Any] = {}
        self.extra_state: Callable[[], dict[str, Any]] | None = None

    # ----------------------------------------------------------------------------------------
    def attach(self, *, model: torch.nn.Module, algorithm: torch.nn.Module,
               optimizer: torch.optim.Optimizer, sampler, scheduler=None,
               samplers: dict[str, Any] | None = None) -> None:
        """Names what the checkpoint holds and, when resuming, restores it: ``algorithm``
        (its ``state_dict`` includes the model's), ``optimizer``, ``scheduler`` (optional),
        ``sampler`` and any further ``samplers`` (``state()``/``load_state()``), and
        torch's global RNG. ``model``'s weights are saved on their own too, for users."""
        self.objects = {"model": model, "algorithm": algorithm, "optimizer": optimizer,
                        "sampler": sampler, "scheduler": scheduler, "samplers": samplers or {}}
        self.output.mkdir(parents=True, exist_ok=True)
        if self.state is not None:
            state = self.state
            try:
                algorithm.load_state_dict(state["algorithm"])
                optimizer.load_state_dict(state["optimizer"])
                if scheduler is not None:
                    scheduler.load_state_dict(state["scheduler"])
                sampler.load_state(state["sampler"])
                for name, extra in (samplers or {}).items():
                    extra.load_state(state["samplers"][name])
                torch.set_rng_state(state["torch_rng"])
                self.start, self.elapsed = int(state["iteration"]), float(state["elapsed"])
                self.window = _load_window(state["window"])
            except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as error:
                raise ckpt.CheckpointError(
                    f"{self.checkpoint_path} cannot resume this run ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''})") from None
            rewrite_metrics(self.metrics_path, self.start)
        else:
            if self.checkpoint_path.exists():
                if not self.quiet:
                    print(f"fastmeta: note: starting a new run in {self.output}; its old "
                          "checkpoint is removed (--resume continues it instead)",
                          file=self.stream, flush=True)
                # Removed with the old log, so a new run stopped before its first checkpoint
                # cannot leave an old checkpoint beside a new log for --resume to mix up.
                self.checkpoint_path.unlink()
            if self.metrics_path.exists():
                self.metrics_path.unlink()  # a fresh run in an old directory starts a fresh log

    def save(self, iteration: int) -> None:
        """Writes the checkpoint (atomically: temporary file, fsync, rename)."""
        import fastmeta

        o = self.objects
        state = {
            "config": self.config,
            "iteration": iteration,
            "model": o["model"].state_dict(),
            "algorithm": o["algorithm"].state_dict(),
            "optimizer": o["optimizer"].state_dict(),
            "sampler": o["sampler"].state(),
            "torch_rng": torch.get_rng_state(),
            "window": dict(self.window),
            "elapsed": self.elapsed,
            "fastmeta_version": fastmeta.__version__,
        }
        if o["scheduler"] is not None:
            state["scheduler"] = o["scheduler"].state_dict()
        if o["samplers"]:
            state["samplers"] = {name: s.state() for name, s in o["samplers"].items()}
        if self.extra_state is not None:
            state.update(self.extra_state())
        ckpt.save(self.checkpoint_path, state)

    # ----------------------------------------------------------------------------------------
    def train(self, step: Callable[[int], dict[str, float]], *, meta_batch: int,
              validate: Callable[[int], dict[str, float]] | None = None,
              validate_every: int | None = None,
              extra_record: Callable[[], dict[str, float]] | None = None,
              desc: str = "meta-training") -> int:
        """Runs ``step(i)`` for i = start+1 .. ``config["iterations"]``; returns the final
        iteration.

        Every ``log_every`` iterations (and at the last) a metrics line gets the window's
        mean of each number ``step`` returned (``None`` values skipped), the tasks per
        second and the training time so far, and ``extra_record()``'s fields; every
        ``validate_every`` iterations (and at the last) ``validate(i)``'s numbers join that
        iteration's line (or a line of their own). Every ``checkpoint_every`` iterations
        (and at the last) the checkpoint is written, after the metrics are flushed, so the
        log never runs behind it. Checkpoint and validation time is not training time.
        """
        config = self.config
        total = config["iterations"]
        start = self.start
        if start > total and not self.quiet:
            print(f"fastmeta: the checkpoint is at iteration {start}, past --iterations {total}; "
                  "not training further", file=self.stream, flush=True)
        progress = Progress(total, min(start, total), self.quiet, self.stream, desc=desc)
        log_every, checkpoint_every = config["log_every"], config["checkpoint_every"]
        shown: dict[str, float] = {}
        last_rate, pending = None, 0
        try:
            with open(self.metrics_path, "a") as metrics:
                tick = time.perf_counter()
                for iteration in range(start + 1, total + 1):
                    values = step(iteration)
                    for key, value in values.items():
                        if value is None:
                            continue
                        value = float(value)
                        if not math.isfinite(value):
                            raise FloatingPointError(
                                f"the meta-training {key} is {value} at iteration {iteration}; "
                                "try a smaller --outer-lr or --inner-lr")
                        self.window[key] = self.window.get(key, 0.0) + value
                        self.window[f"{key}:n"] = self.window.get(f"{key}:n", 0) + 1
                    now = time.perf_counter()
                    self.window["iterations"] = self.window.get("iterations", 0) + 1
                    self.window["seconds"] = self.window.get("seconds", 0.0) + now - tick
                    self.elapsed += now - tick
                    tick = now
                    pending += 1
                    record: dict[str, Any] = {}
                    if iteration % log_every == 0 or iteration == total:
                        record["iteration"] = iteration
                        means = _window_means(self.window)
                        record.update(means)
                        last_rate = (self.window["iterations"] * meta_batch
                                     / max(self.window["seconds"], 1e-9))
                        record["tasks_per_second"] = last_rate
                        record["elapsed"] = self.elapsed
                        if extra_record is not None:
                            record.update(extra_record())
                        shown.update(means)
                        self.window = {}
                    if validate is not None and validate_every and (
                            iteration % validate_every == 0 or iteration == total):
                        found = validate(iteration)
                        record.setdefault("iteration", iteration)
                        record.update(found)
                        shown.update({k: v for k, v in found.items() if "ci95" not in k})
                        tick = time.perf_counter()  # validation time is not training time
                    if record:
                        metrics.write(json.dumps(json_safe(record)) + "\n")
                        metrics.flush()
                    if iteration % checkpoint_every == 0 or iteration == total:
                        metrics.flush()
                        self.save(iteration)
                        tick = time.perf_counter()  # checkpoint time is not training time
                    if pending >= 25 or iteration == total:
                        progress.update(iteration, pending, shown, last_rate)
                        pending = 0
        finally:
            progress.close()
        final = max(start, total)
        if self.state is not None and start >= total:
            pass  # nothing trained: the checkpoint is already final
        elif not self.quiet:
            print(f"fastmeta: trained {total - start} iterations in {self.elapsed:.1f}s of "
                  f"training time; checkpoint {self.checkpoint_path}", file=self.stream,
                  flush=True)
        return final


def _load_window(window) -> dict[str, float]:
    """A checkpoint's running log window; older sinusoid checkpoints hold ``[loss sum,
    iterations, seconds]``."""
    if isinstance(window, dict):
        return {str(k): v for k, v in window.items()}
    loss, count, seconds = window
    return {"loss": float(loss), "loss:n": int(count), "iterations": int(count),
            "seconds": float(seconds)} if count else {}


def _window_means(window: dict[str, float]) -> dict[str, float]:
    means = {}
    for key, value in window.items():
        if key.endswith(":n") or key in ("iterations", "seconds"):
            continue
        count = window.get(f"{key}:n", 0)
        if count:
            means[key] = value / count
    return means
