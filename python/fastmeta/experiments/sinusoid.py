"""The MAML paper's sinusoid regression experiment (Finn et al. 2017, section 5.1).

Meta-trains an MLP ``1-40-40-1`` (ReLU) on tasks ``y = A sin(x - phase)`` with K support
and K query points per task, then evaluates on new tasks: the mean squared error on 100
query points per task after 0, 1 and 10 adaptation steps on K = 5, 10, 20 support points,
beside the paper's baseline, the same network pretrained by plain regression on all tasks
and then fine-tuned on each task.

``train(config)`` runs it end to end (``fastmeta train sinusoid`` on the command line);
``evaluate(algorithm)`` evaluates any trained algorithm wrapper.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import torch
from torch import Tensor, nn

import fastmeta
from fastmeta import checkpoint as ckpt
from fastmeta.data.sinusoid import Sinusoid, SinusoidTasks
from fastmeta.experiments import training
from fastmeta.experiments.training import (figure as _figure, read_metrics, single_thread,
                                           single_threaded as _single_threaded, write_results)
from fastmeta.functional import TaskBatchedModel
from fastmeta.losses import per_task_loss
from fastmeta.stats import format_ci, mean_ci

NAME = "sinusoid"
ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd", "anil")
LAYERS = (1, 40, 40, 1)

#: default run options; ``inner_steps=None`` means 1, or 5 for Reptile
DEFAULTS: dict[str, Any] = {
    "algorithm": "maml",
    "iterations": 3000,
    "meta_batch": 25,
    "shots": 10,
    "inner_lr": 0.01,
    "inner_steps": None,
    "outer_lr": 1e-3,
    "seed": 0,
    "device": "cpu",
    "backend": "auto",
    "output": None,          # runs/sinusoid-<algorithm>
    "eval_tasks": 600,
    "log_every": 100,
    "checkpoint_every": 1000,
    "baseline_steps": 5000,
}

# Evaluation protocol.
EVAL_SHOTS = (5, 10, 20)
EVAL_STEPS = (0, 1, 10)
QUERY_POINTS = 100
BASELINE_LRS = (0.001, 0.003, 0.01, 0.03, 0.1)
VALIDATION_TASKS = 200
# Seed streams, apart from the training stream (Sinusoid(seed=config["seed"])): the test
# tasks are the same for every run (so runs compare on one test set); the validation tasks
# (for the baseline's step size) and the baseline's pretraining tasks are separate again.
TEST_SEED = 1_000_003
VALIDATION_SEED = 2_000_003
BASELINE_SEED_OFFSET = 3_000_003

METRICS_FILE = training.METRICS_FILE
RESULTS_FILE = training.RESULTS_FILE
ADAPTATION_PLOT = "sinusoid_adaptation.png"
LEARNING_CURVE_PLOT = "learning_curve.png"

# What the logged training loss is, per algorithm.
LOSS_LABEL = {"maml": "query MSE after adaptation", "reptile": "support MSE before adaptation"}

# Options that define the run; resuming with a different value is an error.
RUN_OPTIONS = ("algorithm", "meta_batch", "shots", "inner_lr", "inner_steps", "outer_lr", "seed",
               "backend", "log_every", "checkpoint_every")


# Configuration ------------------------------------------------------------------------------
def make_config(options: dict[str, Any]) -> dict[str, Any]:
    """The full run configuration: ``options`` over :data:`DEFAULTS` (``None`` = default)."""
    config = dict(DEFAULTS)
    config.update({k: v for k, v in options.items() if v is not None and k in DEFAULTS})
    config["dataset"] = NAME
    if config["algorithm"] not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {config['algorithm']!r}; choose from {', '.join(ALGORITHMS)}")
    if config["inner_steps"] is None:
        config["inner_steps"] = 5 if config["algorithm"] == "reptile" else 1
    if config["output"] is None:
        config["output"] = os.path.join("runs", f"{NAME}-{config['algorithm']}")
    config["output"] = str(config["output"])
    for key in ("iterations", "meta_batch", "shots", "inner_steps", "eval_tasks", "log_every",
                "checkpoint_every", "baseline_steps"):
        training.require_positive_int(config, key, prefix="")
    for key in ("inner_lr", "outer_lr"):
        training.require_positive_number(config, key, prefix="")
    return config


def build(config: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """The MLP and its algorithm wrapper, on ``config["device"]``. The weights come from
    torch's global RNG (seed it first for a reproducible run)."""
    device = torch.device(config["device"])
    model = fastmeta.models.mlp(list(LAYERS)).to(device)
    name, lr, steps, backend = (config["algorithm"], config["inner_lr"], config["inner_steps"],
                                config["backend"])
    if name == "maml":
        wrapper = fastmeta.MAML(model, lr, steps, first_order=False, backend=backend)
    elif name == "fomaml":
        wrapper = fastmeta.MAML(model, lr, steps, first_order=True, backend=backend)
    elif name == "metasgd":
        wrapper = fastmeta.MetaSGD(model, inner_lr_init=lr, inner_steps=steps, backend=backend)
    elif name == "anil":
        wrapper = fastmeta.ANIL(model, inner_lr=lr, inner_steps=steps, backend=backend)
    elif name == "reptile":
        wrapper = fastmeta.Reptile(model, lr, steps, backend=backend)
    else:
        raise ValueError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")
    return model, wrapper.to(device)


def meta_loss(wrapper: nn.Module, tasks: SinusoidTasks) -> Tensor:
    """One meta-batch's training loss (its ``backward`` gives the meta-gradient)."""
    if isinstance(wrapper, fastmeta.Reptile):
        return wrapper(tasks.support_x, tasks.support_y)
    return wrapper(tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)


def adaptation_note(config: dict[str, Any]) -> str:
    name, lr = config["algorithm"], config["inner_lr"]
    if name == "metasgd":
        return "adapts with its learned per-weight step sizes"
    if name == "anil":
        return f"adapts the last layer only, SGD step size {lr:g}"
    return f"adapts all weights with SGD, step size {lr:g}"


# Training -----------------------------------------------------------------------------------
@_single_threaded
def train(config: dict[str, Any], resume: bool = False, quiet: bool = False,
          evaluate_after: bool = True, stream: TextIO | None = None,
          results_stream: TextIO | None = None, explicit: Sequence[str] = ()) -> dict[str, Any]:
    """Meta-trains ``config["algorithm"]`` on sinusoid tasks, checkpointing to
    ``<output>/checkpoint.pt`` and logging to ``<output>/metrics.jsonl``; then (unless
    ``evaluate_after`` is False) evaluates, writes ``results.json`` and the plots, and prints
    the results table to ``results_stream`` (stdout by default).

    ``resume=True`` continues from the checkpoint in ``<output>`` up to
    ``config["iterations"]``; the final weights are bit-identical to an uninterrupted run's.
    The run's other options come from the checkpoint; those named in ``explicit`` (the
    options the user gave) must agree with it.
    Returns the results (or, without evaluation, ``{"iteration": ..., "output": ...}``).
    """
    results_stream = sys.stdout if results_stream is None else results_stream
    run = training.Run(config, dataset=NAME, run_options=RUN_OPTIONS, resume=resume,
                       quiet=quiet, explicit=explicit, stream=stream)
    config = run.config
    output, metrics_path = run.output, run.metrics_path

    torch.manual_seed(config["seed"])
    model, wrapper = build(config)
    optimizer = torch.optim.Adam(wrapper.parameters(), lr=config["outer_lr"])
    sampler = Sinusoid(k_shot=config["shots"], q_query=config["shots"], seed=config["seed"])
    device = torch.device(config["device"])
    run.attach(model=model, algorithm=wrapper, optimizer=optimizer, sampler=sampler)

    def step(iteration: int) -> dict[str, float]:
        tasks = sampler.sample(config["meta_batch"], device=device)
        loss = meta_loss(wrapper, tasks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach())}

    def extra_record() -> dict[str, float]:
        if isinstance(wrapper, fastmeta.MetaSGD):
            return {"mean_inner_lr": float(torch.cat(
                [p.detach().reshape(-1) for p in wrapper.inner_lrs]).mean())}
        return {}

    final_iteration = run.train(step, meta_batch=config["meta_batch"], extra_record=extra_record)
    elapsed = run.elapsed
    if not evaluate_after:
        return {"iteration": final_iteration, "output": str(output)}

    eval_start = time.perf_counter()
    results = evaluate(wrapper, num_tasks=config["eval_tasks"], device=device,
                       baseline_steps=config["baseline_steps"],
                       baseline_seed=config["seed"] + BASELINE_SEED_OFFSET,
                       plot_path=output / ADAPTATION_PLOT,
                       label=config["algorithm"])
    results.update(run_summary(config, final_iteration, elapsed))
    results["eval_seconds"] = time.perf_counter() - eval_start
    write_results(output / RESULTS_FILE, results)
    plot_learning_curve(metrics_path, output / LEARNING_CURVE_PLOT,
                        title=f"{NAME}: {config['algorithm']} meta-training",
                        ylabel=LOSS_LABEL.get(config["algorithm"], LOSS_LABEL["maml"]))
    print(format_table(results), file=results_stream, flush=True)
    print(f"results: {output / RESULTS_FILE}; plots: {output / ADAPTATION_PLOT}, "
          f"{output / LEARNING_CURVE_PLOT}", file=results_stream, flush=True)
    return results


def run_summary(config: dict[str, Any], iteration: int, elapsed: float) -> dict[str, Any]:
    return {"dataset": NAME, "algorithm": config["algorithm"], "iterations": iteration,
            "train_seconds": elapsed,
            "config": dict(config),
            "adaptation": adaptation_note(config)}


# Evaluation ---------------------------------------------------------------------------------
def sample_tasks(num_tasks: int, seed: int, device: torch.device | str = "cpu",
                 max_shots: int = max(EVAL_SHOTS), query_points: int = QUERY_POINTS) -> SinusoidTasks:
    """Evaluation tasks with ``max_shots`` support points (K-shot uses the first K) and
    ``query_points`` query points each, from their own seed stream."""
    return Sinusoid(k_shot=max_shots, q_query=query_points, seed=seed).sample(num_tasks, device=device)


def _query_mse(adapt: Callable[[Tensor, Tensor, int], Callable[[Tensor], Tensor]],
               support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
               steps: int) -> Tensor:
    """Per-task query MSE ``[T]`` after ``steps`` adaptation steps; a task whose adaptation
    diverges scores ``inf`` (the library refuses non-finite losses for the whole batch, so
    the batch is then retried task by task)."""
    try:
        predict = adapt(support_x, support_y, steps)
        losses = per_task_loss("mse", predict(query_x), query_y)
    except FloatingPointError:
        losses = torch.empty(support_x.shape[0], dtype=query_y.dtype, device=query_y.device)
        for t in range(support_x.shape[0]):
            one = slice(t, t + 1)
            try:
                predict = adapt(support_x[one], support_y[one], steps)
                losses[t] = per_task_loss("mse", predict(query_x[one]), query_y[one])[0]
            except FloatingPointError:
                losses[t] = math.inf
    return torch.where(torch.isfinite(losses), losses, torch.full_like(losses, math.inf)).cpu()


def _mse_after_adaptation(adapt: Callable[[Tensor, Tensor, int], Callable[[Tensor], Tensor]],
                          tasks: SinusoidTasks, shots: Sequence[int], steps: Sequence[int]
                          ) -> dict[int, dict[int, Tensor]]:
    """Per-task query MSE ``[T]`` for every K and number of steps."""
    out: dict[int, dict[int, Tensor]] = {}
    with torch.no_grad():
        for k in shots:
            sx, sy = tasks.support_x[:, :k], tasks.support_y[:, :k]
            out[k] = {s: _query_mse(adapt, sx, sy, tasks.query_x, tasks.query_y, s) for s in steps}
    return out


def _summarise(per_task: dict[int, dict[int, Tensor]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean MSE and 95% CI half-width per K and steps. When the adaptation of some tasks
    blew up (infinite MSE), ``diverged`` counts them and the mean and CI are over the others
    (``None`` when every task diverged)."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for k, by_steps in per_task.items():
        summary[str(k)] = {}
        for s, losses in by_steps.items():
            finite = torch.isfinite(losses)
            diverged = int((~finite).sum())
            if diverged == losses.numel():
                cell = {"mse": None, "ci95": None}
            else:
                mean, ci = mean_ci(losses[finite])
                cell = {"mse": mean, "ci95": ci}
            if diverged:
                cell["diverged"] = diverged
            summary[str(k)][str(s)] = cell
    return summary


def _finetuned_weights(model: nn.Module, support_x: Tensor, support_y: Tensor,
                       lr: float | Tensor, steps: Sequence[int]):
    """Yields ``(steps, fast_weights)`` along plain SGD on every task's support set, for each
    number of steps in ``steps`` (ascending). ``lr`` is a float or one step size per task."""
    batched = TaskBatchedModel(model)
    num_tasks = support_x.shape[0]
    fast = [p.detach().unsqueeze(0).expand(num_tasks, *p.shape) for p in model.parameters()]
    if isinstance(lr, Tensor):
        lr = lr.to(device=support_x.device, dtype=support_x.dtype)
        lrs = [lr.reshape(-1, *([1] * p.dim())) for p in model.parameters()]
    else:
        lrs = [float(lr)] * len(fast)
    done = 0
    with torch.enable_grad():
        for target in sorted(steps):
            for _ in range(target - done):
                fast = [w.detach().requires_grad_() for w in fast]
                losses = per_task_loss("mse", batched(fast, support_x), support_y)
                grads = torch.autograd.grad(losses.sum(), fast)
                fast = [w.detach() - a * g for w, a, g in zip(fast, lrs, grads)]
            done = target
            yield target, [w.detach() for w in fast]


def finetune(model: nn.Module, support_x: Tensor, support_y: Tensor, lr: float | Tensor,
             steps: int) -> Callable[[Tensor], Tensor]:
    """Plain SGD fine-tuning of ``model`` on every task's support set (all tasks at once,
    ``lr`` a float or one step size per task); returns the per-task fine-tuned models.
    Diverging tasks give non-finite predictions rather than an error."""
    batched = TaskBatchedModel(model)
    (_, fast), = _finetuned_weights(model, support_x, support_y, lr, [steps])
    return lambda x: batched(fast, x)


def pretrain_baseline(steps: int = 5000, seed: int = BASELINE_SEED_OFFSET,
                      device: torch.device | str = "cpu", tasks_per_step: int = 25,
                      points_per_task: int = 10, lr: float = 1e-3) -> nn.Module:
    """The paper's "pretrained on all tasks" baseline: the same MLP trained by plain
    regression (Adam) on points pooled from many random tasks. Leaves torch's global RNG
    untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fastmeta.models.mlp(list(LAYERS)).to(device)
    sampler = Sinusoid(k_shot=points_per_task, q_query=1, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            tasks = sampler.sample(tasks_per_step, device=device)
            prediction = model(tasks.support_x.reshape(-1, 1))
            loss = torch.mean((prediction - tasks.support_y.reshape(-1, 1)) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model


def _choose_lrs(model: nn.Module, tasks: SinusoidTasks, shots: Sequence[int], steps: Sequence[int],
                grid: Sequence[float]) -> dict[str, dict[str, float]]:
    """The grid step size with the lowest mean validation MSE, per K and number of steps
    (every step size runs at once, as copies of the validation tasks)."""
    batched = TaskBatchedModel(model)
    num_tasks, n = tasks.support_x.shape[0], len(grid)
    lrs = torch.tensor(list(grid), dtype=torch.float64).repeat_interleave(num_tasks)
    query_x, query_y = tasks.query_x.repeat(n, 1, 1), tasks.query_y.repeat(n, 1, 1)
    chosen: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for k in shots:
            chosen[str(k)] = {}
            sx = tasks.support_x[:, :k].repeat(n, 1, 1)
            sy = tasks.support_y[:, :k].repeat(n, 1, 1)
            for s, fast in _finetuned_weights(model, sx, sy, lrs, steps):
                losses = per_task_loss("mse", batched(fast, query_x), query_y).reshape(n, num_tasks)
                scores = [float(row.mean()) for row in losses]
                scores = [v if math.isfinite(v) else math.inf for v in scores]
                best = min(range(n), key=lambda i: (scores[i], grid[i]))
                chosen[str(k)][str(s)] = grid[best]
    return chosen


@_single_threaded
def evaluate(algorithm: nn.Module, num_tasks: int = 600, shots: Sequence[int] = EVAL_SHOTS,
             steps: Sequence[int] = EVAL_STEPS, query_points: int = QUERY_POINTS,
             seed: int = TEST_SEED, device: torch.device | str | None = None,
             baseline: bool = True, baseline_steps: int = 5000,
             baseline_seed: int = BASELINE_SEED_OFFSET, validation_tasks: int = VALIDATION_TASKS,
             lr_grid: Sequence[float] = BASELINE_LRS, plot_path: str | os.PathLike | None = None,
             label: str | None = None) -> dict[str, Any]:
    """Evaluates a trained algorithm wrapper (``MAML``, ``MetaSGD``, ``ANIL``, ``Reptile``)
    on ``num_tasks`` new sinusoid tasks.

    For every K in ``shots`` and number of steps in ``steps``, each task adapts with
    ``algorithm.adapt`` on its first K support points (SGD with the inner step size; Meta-SGD
    with its learned step sizes; ANIL the head only) and is scored by the mean squared error
    on ``query_points`` query points. Results are mean MSE over tasks with a 95% confidence
    interval (``1.96 * std / sqrt(n)``): ``results["algorithm_results"][K][steps]``.

    With ``baseline``, also the pretrained-then-fine-tuned baseline
    (``results["baseline"]``): :func:`pretrain_baseline`, then SGD fine-tuning whose step
    size is chosen, per K and number of steps, from ``lr_grid`` on ``validation_tasks``
    separate validation tasks. ``plot_path`` writes the Figure-2-style plot there.
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    shots, steps = tuple(shots), tuple(steps)
    if not shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in shots):
        raise ValueError(f"shots must be positive integers, got {shots!r}")
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
        raise ValueError(f"steps must be non-negative integers, got {steps!r}")
    if device is None:
        device = next(algorithm.parameters()).device
    device = torch.device(device)
    label = label or type(algorithm).__name__.lower()
    tasks = sample_tasks(num_tasks, seed, device, max(shots), query_points)
    per_task = _mse_after_adaptation(lambda x, y, s: algorithm.adapt(x, y, s), tasks, shots, steps)
    results: dict[str, Any] = {
        "eval_tasks": num_tasks, "query_points": query_points, "shots": list(shots),
        "steps": list(steps), "test_seed": seed, "label": label,
        "algorithm_results": _summarise(per_task),
    }
    if baseline:
        pretrained = pretrain_baseline(baseline_steps, baseline_seed, device)
        validation = sample_tasks(validation_tasks, VALIDATION_SEED, device, max(shots), query_points)
        chosen = _choose_lrs(pretrained, validation, shots, [s for s in steps if s > 0], lr_grid)
        baseline_per_task = {k: {} for k in shots}
        for k in shots:
            for s in steps:
                lr = chosen[str(k)][str(s)] if s > 0 else 0.0
                baseline_per_task[k].update(_mse_after_adaptation(
                    lambda x, y, n: finetune(pretrained, x, y, lr, n), tasks, [k], [s])[k])
        results["baseline"] = {
            "description": "the same MLP pretrained by regression on points pooled from random "
                           "tasks, then fine-tuned on each task's K points with SGD",
            "pretrain_steps": baseline_steps, "lr_grid": list(lr_grid),
            "validation_tasks": validation_tasks, "chosen_lr": chosen,
            "results": _summarise(baseline_per_task),
        }
    if plot_path is not None:
        plot_adaptation(algorithm, pretrained if baseline else None, tasks, plot_path,
                        label=label, baseline_lrs=results["baseline"]["chosen_lr"] if baseline else None)
    return results


@_single_threaded
def evaluate_checkpoint(state: dict[str, Any], output: str | os.PathLike | None = None,
                        eval_tasks: int | None = None, seed: int | None = None,
                        device: str | None = None, baseline_steps: int | None = None,
                        results_stream: TextIO | None = None,
                        metrics_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``fastmeta eval``: rebuilds the checkpoint's model, evaluates it, prints the table and
    writes ``results.json`` and the adaptation plot to ``output`` (and the learning curve,
    given the run's ``metrics_path``)."""
    results_stream = sys.stdout if results_stream is None else results_stream
    config = dict(state["config"])
    if device is not None:
        config["device"] = device
    if eval_tasks is not None:
        config["eval_tasks"] = eval_tasks
    if baseline_steps is not None:
        config["baseline_steps"] = baseline_steps
    output = Path(config["output"] if output is None else output)
    output.mkdir(parents=True, exist_ok=True)
    model, wrapper = build(config)
    try:
        wrapper.load_state_dict(state["algorithm"])
    except (KeyError, RuntimeError) as error:
        raise ckpt.CheckpointError(f"the checkpoint's weights do not fit a {config['algorithm']} "
                                   f"{NAME} model ({str(error).splitlines()[0]})") from None
    start = time.perf_counter()
    results = evaluate(wrapper, num_tasks=config["eval_tasks"],
                       seed=TEST_SEED if seed is None else seed, device=config["device"],
                       baseline_steps=config["baseline_steps"],
                       baseline_seed=config["seed"] + BASELINE_SEED_OFFSET,
                       plot_path=output / ADAPTATION_PLOT, label=config["algorithm"])
    results.update(run_summary(config, int(state["iteration"]), float(state.get("elapsed", 0.0))))
    results["eval_seconds"] = time.perf_counter() - start
    write_results(output / RESULTS_FILE, results)
    plots = [output / ADAPTATION_PLOT]
    if metrics_path is not None and plot_learning_curve(
            metrics_path, output / LEARNING_CURVE_PLOT,
            title=f"{NAME}: {config['algorithm']} meta-training",
            ylabel=LOSS_LABEL.get(config["algorithm"], LOSS_LABEL["maml"])) is not None:
        plots.append(output / LEARNING_CURVE_PLOT)
    print(format_table(results), file=results_stream, flush=True)
    print(f"results: {output / RESULTS_FILE}; plots: {', '.join(map(str, plots))}",
          file=results_stream, flush=True)
    return results


# Reporting ----------------------------------------------------------------------------------
def format_table(results: dict[str, Any]) -> str:
    """The results as a compact text table: MSE ± 95% CI per method, steps and K."""
    shots = [str(k) for k in results["shots"]]
    steps = [str(s) for s in results["steps"]]
    label = results.get("algorithm") or results.get("label", "meta-learned")
    tables = [results["algorithm_results"]] + (
        [results["baseline"]["results"]] if "baseline" in results else [])
    width = 23 if any(cell.get("diverged") for table in tables for by_k in table.values()
                      for cell in by_k.values()) else 17
    lines = []
    head = f"{NAME}: {label}"
    if "iterations" in results:
        head += f", {results['iterations']} meta-training iterations"
    lines.append(head)
    lines.append(f"test MSE ± 95% CI over {results['eval_tasks']} new tasks, "
                 f"{results['query_points']} query points each")
    lines.append(f"{'method':<26}{'steps':>5}  " + "".join(f"{'K=' + k:<{width}}" for k in shots))

    def rows(name: str, table: dict) -> None:
        for i, s in enumerate(steps):
            cells = []
            for k in shots:
                cell = table[k][s]
                mse, ci = cell["mse"], cell["ci95"]
                if mse is None:
                    text = "all diverged"
                else:
                    text = format_ci(mse, math.nan if ci is None else ci)
                    if cell.get("diverged"):
                        text += f" ({cell['diverged']} div.)"
                cells.append(f"{text:<{width}}")
            lines.append(f"{(name if i == 0 else ''):<26}{s:>5}  " + "".join(cells))

    rows(label, results["algorithm_results"])
    if "baseline" in results:
        rows("pretrained + fine-tuned", results["baseline"]["results"])
    if "adaptation" in results:
        lines.append(f"{label} {results['adaptation']}.")
    if any(cell.get("diverged") for table in tables for by_k in table.values()
           for cell in by_k.values()):
        lines.append("(n div.): the adaptation of n test tasks diverged (infinite MSE); the mean "
                     "and CI are over the other tasks.")
    if "baseline" in results:
        b = results["baseline"]
        chosen = "; ".join(
            f"K={k}: " + ", ".join(f"{b['chosen_lr'][k][s]:g} ({s} step{'s' if s != '1' else ''})"
                                   for s in steps if s != "0") for k in shots)
        grid = ", ".join(f"{lr:g}" for lr in b["lr_grid"])
        lines.append(f"baseline: pretrained {b['pretrain_steps']} Adam steps on pooled tasks; "
                     f"SGD step size chosen from {{{grid}}} on {b['validation_tasks']} separate "
                     f"validation tasks: {chosen}.")
    return "\n".join(lines)


# Plots --------------------------------------------------------------------------------------
def _figure(rows: int, cols: int, size: tuple[float, float]):
    """A matplotlib figure on the Agg canvas (no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False)


def plot_adaptation(algorithm: nn.Module, baseline: nn.Module | None, tasks: SinusoidTasks,
                    path: str | os.PathLike, label: str = "MAML", shots: Sequence[int] = (5, 10),
                    baseline_lrs: dict | None = None, task: int = 0) -> Path:
    """Figure 2 of the MAML paper for one test task: the true curve, the K support points,
    the predictions before adaptation and after 1 and 10 steps, for the meta-learned model
    (top row) and the pretrained baseline (bottom row), at each K (columns)."""
    device = tasks.support_x.device
    amplitude, phase = float(tasks.amplitude[task]), float(tasks.phase[task])
    grid = torch.linspace(*Sinusoid.x_range, 200, dtype=tasks.support_x.dtype, device=device)
    truth = Sinusoid.curve(amplitude, phase, grid)
    methods = [(label, lambda x, y, s: algorithm.adapt(x, y, s), None)]
    if baseline is not None:
        methods.append(("pretrained", None, baseline))
    figure, axes = _figure(len(methods), len(shots), (5.5 * len(shots), 4.0 * len(methods)))
    styles = {0: ("pre-update", ":", "tab:green"), 1: ("1 grad step", "--", "tab:orange"),
              10: ("10 grad steps", "-", "tab:red")}
    with torch.no_grad():
        for row, (name, adapt, model) in enumerate(methods):
            for col, k in enumerate(shots):
                ax = axes[row][col]
                sx = tasks.support_x[task:task + 1, :k]
                sy = tasks.support_y[task:task + 1, :k]
                ax.plot(grid.cpu(), truth.cpu(), color="tab:blue", lw=2, label="ground truth")
                ax.scatter(sx.reshape(-1).cpu(), sy.reshape(-1).cpu(), color="black", marker="^",
                           zorder=5, label=f"{k} points used for gradient")
                for steps, (text, linestyle, color) in styles.items():
                    try:
                        if adapt is not None:
                            predict = adapt(sx, sy, steps)
                        else:
                            lr = 0.0 if steps == 0 else float(
                                (baseline_lrs or {}).get(str(k), {}).get(str(steps), 0.01))
                            predict = finetune(model, sx, sy, lr, steps)
                        y = predict(grid.reshape(1, -1, 1)).reshape(-1)
                    except FloatingPointError:  # this adaptation diverged: no curve
                        ax.plot([], [], linestyle=linestyle, color=color, label=f"{text} (diverged)")
                        continue
                    ax.plot(grid.cpu(), y.cpu(), linestyle=linestyle, color=color, label=text)
                ax.set_title(f"{name}, K={k}")
                ax.set_xlim(*Sinusoid.x_range)
                ax.set_ylim(-6, 6)
                ax.legend(loc="lower left", fontsize=7)
    figure.suptitle(f"sinusoid task A={amplitude:.2f}, phase={phase:.2f}")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


def plot_learning_curve(metrics_path: str | os.PathLike, path: str | os.PathLike,
                        title: str = "meta-training", ylabel: str = "meta-training loss (MSE)"
                        ) -> Path | None:
    """The meta-training loss (each point a mean over ``log_every`` iterations) and its
    centred moving average against the iteration; None when there are no metrics."""
    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not records:
        return None
    iterations = [r["iteration"] for r in records]
    losses = [r["loss"] for r in records]
    span = max(1, round(len(losses) / 20)) | 1  # odd
    figure, axes = _figure(1, 1, (6.5, 4.0))
    ax = axes[0][0]
    if span == 1:
        ax.plot(iterations, losses, color="tab:blue", lw=2, label="mean loss per log interval")
    else:
        smoothed = []  # centred, so the curve does not lag behind the loss
        for i in range(len(losses)):
            lo, hi = max(0, i - span // 2), min(len(losses), i + span // 2 + 1)
            smoothed.append(sum(losses[lo:hi]) / (hi - lo))
        ax.plot(iterations, losses, color="tab:blue", alpha=0.3, lw=1,
                label="mean loss per log interval")
        ax.plot(iterations, smoothed, color="tab:blue", lw=2,
                label=f"moving average of {span} intervals")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path
