"""The ``fastmeta`` command line.

    fastmeta train [DATASET] [options]   meta-train, checkpoint, evaluate, plot
    fastmeta eval CHECKPOINT [options]   evaluate a checkpoint (or a run directory)

``fastmeta train`` alone is the main job: MAML, 5-way 1-shot, on the embedded digits.

Every user error (a bad option, a missing or corrupt checkpoint, an argument the library
rejects) prints one line ``fastmeta: error: ...`` to stderr and exits with status 2.
Set ``FASTMETA_DEBUG=1`` to get the full traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

from fastmeta.experiments import DEFAULT_DATASET, EXPERIMENTS

PROG = "fastmeta"
ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd", "anil", "protonet", "relationnet")
EXIT_USAGE = 2


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def fail(message: str) -> None:
    """Prints ``fastmeta: error: message`` (one line) to stderr and exits with status 2."""
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(message)


# Argument types -----------------------------------------------------------------------------
def _number_type(convert, accept, what: str):
    """An argparse type: ``convert(text)``, rejected unless ``accept(value)``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number_type(int, lambda v: v >= 0, "a non-negative integer")
# (torch's seeds are 64-bit; a float32 optimizer cannot hold a larger learning rate)
seed_int = _number_type(int, lambda v: 0 <= v < 2 ** 63, "an integer in [0, 2^63)")
positive_float = _number_type(float, lambda v: 0 < v <= 3.4e38, "a positive number up to 3.4e38")
image_size = _number_type(int, lambda v: 1 <= v <= 4096, "an integer from 1 to 4096")
threads = _number_type(int, lambda v: 1 <= v <= 1024, "an integer from 1 to 1024")


def output_dir(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a directory, got an empty string")
    return text


def device(text: str) -> str:
    from fastmeta.experiments.training import check_device

    try:
        check_device(text, what="device")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fastmeta")
    except Exception:  # pragma: no cover - not installed as a distribution
        return "unknown"


# The parser ---------------------------------------------------------------------------------
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Fast meta-learning (MAML, first-order MAML, Reptile, Meta-SGD, ANIL, "
                    "Prototypical and Relation Networks): train and evaluate the standard "
                    "experiments. `fastmeta train` alone meta-trains MAML on 5-way 1-shot "
                    "handwritten digits.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train", help="meta-train on a dataset, then evaluate and plot",
        description="Meta-train, checkpoint and log to --output, then evaluate on new tasks "
                    "beside the baselines: prints a results table and writes results.json, "
                    "metrics.jsonl, checkpoint.pt and plots. With no arguments: MAML, 5-way "
                    "1-shot on the embedded handwritten digits (a few minutes on 2 cores). "
                    "Defaults depend on the dataset and algorithm; results.json and the "
                    "checkpoint record every value used.")
    train.add_argument("dataset", nargs="?", default=None, choices=sorted(EXPERIMENTS),
                       help=f"the task distribution (default {DEFAULT_DATASET}; with --resume, "
                            "the checkpoint's)")
    train.add_argument("--algorithm", "-a", choices=ALGORITHMS,
                       help="meta-learning algorithm (default maml)")
    train.add_argument("--data", metavar="PATH",
                       help="omniglot: the folder holding images_background.zip and "
                            "images_evaluation.zip; folder: a folder of class sub-folders "
                            "(default $FASTMETA_DATA)")
    train.add_argument("--ways", "-N", type=positive_int,
                       help="N: classes per task (default 5)")
    train.add_argument("--shots", "-k", type=positive_int,
                       help="K: support examples per class (classification, default 1) or "
                            "support and query points per task (sinusoid, default 10)")
    train.add_argument("--queries", type=positive_int,
                       help="query images per class in training tasks (digits 15, omniglot 5)")
    train.add_argument("--eval-queries", type=positive_int,
                       help="query images per class in validation and test tasks (default 15)")
    train.add_argument("--train-ways", type=positive_int,
                       help="protonet/relationnet: classes per training task (default --ways; "
                            "omniglot protonet 60)")
    train.add_argument("--model", choices=("mlp", "conv"),
                       help="classification network: conv (conv blocks; conv4 at 28x28) or mlp "
                            "(runs on the compiled MLP engine) (default conv)")
    train.add_argument("--augment", choices=("flip", "none"),
                       help="classification: flip adds the training classes' mirror images as "
                            "new classes (default: digits flip, otherwise none)")
    train.add_argument("--image-size", type=image_size,
                       help="omniglot/folder: images resized to this square size (default 28)")
    train.add_argument("--iterations", "-n", type=positive_int,
                       help="meta-training iterations (meta-updates)")
    train.add_argument("--meta-batch", type=positive_int, help="tasks per meta-update")
    train.add_argument("--inner-lr", type=positive_float,
                       help="inner-loop SGD step size (Meta-SGD: its initial value)")
    train.add_argument("--inner-steps", type=positive_int,
                       help="inner-loop SGD steps during meta-training (reptile default 5)")
    train.add_argument("--eval-steps", type=non_negative_int,
                       help="classification: adaptation steps at validation and test time "
                            "(default --inner-steps)")
    train.add_argument("--outer-lr", type=positive_float,
                       help="meta-optimizer (Adam) learning rate (default 0.001)")
    train.add_argument("--lr-halve-every", type=positive_int, metavar="N",
                       help="classification: halve the outer learning rate every N iterations")
    train.add_argument("--seed", type=seed_int,
                       help="seed for the initial weights and the training tasks (default 0)")
    train.add_argument("--device", type=device, help="torch device (default cpu)")
    train.add_argument("--backend", choices=("auto", "cpu", "cuda", "torch"),
                       help="fastmeta engine of the gradient-based algorithms (default auto)")
    train.add_argument("--output", "-o", type=output_dir,
                       help="run directory (default runs/<dataset>-<algorithm>)")
    train.add_argument("--eval-tasks", type=positive_int,
                       help="new tasks for the final evaluation (default 600)")
    train.add_argument("--val-every", type=positive_int,
                       help="classification: iterations between validations on held-out "
                            "classes")
    train.add_argument("--val-tasks", type=positive_int,
                       help="classification: validation tasks (default 100)")
    train.add_argument("--log-every", type=positive_int,
                       help="iterations between metrics.jsonl lines")
    train.add_argument("--checkpoint-every", type=positive_int,
                       help="iterations between checkpoints (always at the end)")
    train.add_argument("--baseline-steps", type=positive_int,
                       help="Adam steps pretraining the baseline")
    train.add_argument("--finetune-steps", type=positive_int,
                       help="classification: the baselines' Adam steps on each support set "
                            "(default: chosen from 20, 50, 100 on validation tasks)")
    train.add_argument("--threads", type=threads,
                       help="classification: torch threads (default 1: small networks; on a "
                            "busy machine more threads mostly wait)")
    train.add_argument("--no-eval", action="store_true",
                       help="stop after training: no evaluation, results table or plots")
    train.add_argument("--resume", action="store_true",
                       help="continue from <output>/checkpoint.pt up to --iterations "
                            "(bit-identical to an uninterrupted run)")
    train.add_argument("--quiet", "-q", action="store_true",
                       help="no progress bar or log lines (the results table still prints)")
    train.set_defaults(func=run_train)

    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint",
        description="Evaluate a checkpoint on new tasks beside the baselines (classification: "
                    "600 test tasks, accuracy ± 95% CI, beside the same network trained from "
                    "scratch and pretrained-then-fine-tuned on each support set); prints the "
                    "results table and writes results.json and the plots.")
    evaluate.add_argument("checkpoint", help="a checkpoint.pt, or a run directory holding one")
    evaluate.add_argument("--eval-tasks", type=positive_int,
                          help="new tasks to evaluate on (default: the run's, 600)")
    evaluate.add_argument("--output", "-o", type=output_dir,
                          help="where to write results.json and plots (default: the "
                               "checkpoint's directory)")
    evaluate.add_argument("--seed", type=seed_int,
                          help="seed of the test tasks (default: the standard test set)")
    evaluate.add_argument("--device", type=device, help="torch device (default: the run's)")
    evaluate.add_argument("--baseline-steps", type=positive_int,
                          help="Adam steps pretraining the baseline (default: the run's)")
    evaluate.add_argument("--finetune-steps", type=positive_int,
                          help="classification: the baselines' Adam steps on each support set "
                               "(default: the run's; if it set none, chosen from 20, 50, 100 "
                               "on validation tasks)")
    evaluate.add_argument("--data", metavar="PATH",
                          help="omniglot/folder: the data (default: the run's, or "
                               "$FASTMETA_DATA)")
    evaluate.add_argument("--quiet", "-q", action="store_true", help="no warnings")
    evaluate.set_defaults(func=run_eval)
    return parser


TRAIN_OPTIONS = ("algorithm", "iterations", "meta_batch", "shots", "inner_lr", "inner_steps",
                 "outer_lr", "seed", "device", "backend", "output", "eval_tasks", "log_every",
                 "checkpoint_every", "baseline_steps", "data", "ways", "queries", "eval_queries",
                 "train_ways", "model", "image_size", "eval_steps", "lr_halve_every",
                 "val_every", "val_tasks", "finetune_steps", "threads", "augment")


def _dataset_of_checkpoint(output: str | None) -> str | None:
    """The dataset of the run in ``output`` (for ``--resume`` without a dataset), if readable."""
    from fastmeta import checkpoint

    if output is None:
        return None
    try:
        config = checkpoint.load(output).get("config")
    except (OSError, ValueError):
        return None  # the resume itself reports it
    dataset = config.get("dataset") if isinstance(config, dict) else None
    return dataset if dataset in EXPERIMENTS else None


def _check_checkpoint(path, module, state=None) -> None:
    """The checkpoint's configuration and iteration are those of a valid run (when it exists:
    a missing one is reported by the command itself)."""
    from fastmeta import checkpoint
    from fastmeta.experiments import training

    path = checkpoint.resolve_path(path)
    if state is None:
        if not path.exists():
            return
        state = checkpoint.load(path)
    training.check_saved_run(state, path, module.make_config)


# Commands -----------------------------------------------------------------------------------
def run_train(args: argparse.Namespace) -> int:
    from fastmeta import experiments

    dataset = args.dataset
    if args.resume and args.output is not None:
        previous = _dataset_of_checkpoint(args.output)
        if dataset is None:
            dataset = previous
        elif previous is not None and previous != dataset:
            fail(f"--resume: the run in {args.output} is a {previous} run, not {dataset}")
    if dataset is None:
        dataset = DEFAULT_DATASET
    module = experiments.get(dataset)
    options = {name: getattr(args, name) for name in TRAIN_OPTIONS}
    explicit = [name for name, value in options.items() if value is not None]
    accepted = getattr(module, "DEFAULTS", {})
    for name in explicit:
        if name not in accepted:
            fail(f"argument --{name.replace('_', '-')}: does not apply to {dataset}")
    if args.algorithm is not None and args.algorithm not in module.ALGORITHMS:
        fail(f"argument --algorithm/-a: {args.algorithm} is not available for {dataset}; "
             f"choose from {', '.join(module.ALGORITHMS)}")
    options["dataset"] = dataset
    config = module.make_config(options)
    if args.resume:
        _check_checkpoint(config["output"], module)
    module.train(config, resume=args.resume, quiet=args.quiet, explicit=explicit,
                 evaluate_after=not args.no_eval)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from fastmeta import checkpoint, experiments
    from fastmeta.experiments import training

    path = checkpoint.resolve_path(args.checkpoint)
    state = checkpoint.load(path)
    config = state.get("config")
    if not isinstance(config, dict) or config.get("dataset") not in EXPERIMENTS:
        raise checkpoint.CheckpointError(f"{path} does not say which experiment it is from")
    module = experiments.get(config["dataset"])
    _check_checkpoint(path, module, state)
    training.check_device(args.device or config.get("device", "cpu"))
    output = Path(args.output) if args.output else path.parent
    metrics = path.parent / getattr(module, "METRICS_FILE", "metrics.jsonl")
    extra = {}
    for name in ("data", "finetune_steps"):
        if getattr(args, name) is not None:
            if name not in getattr(module, "DEFAULTS", {}):
                fail(f"argument --{name.replace('_', '-')}: does not apply to {config['dataset']}")
            extra[name] = getattr(args, name)
    module.evaluate_checkpoint(state, output=output, eval_tasks=args.eval_tasks, seed=args.seed,
                               device=args.device, baseline_steps=args.baseline_steps,
                               metrics_path=metrics, **extra)
    return 0


@contextlib.contextmanager
def _one_line_warnings(quiet: bool):
    """Library warnings as one ``fastmeta: note: ...`` line each (none with --quiet)."""
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        else:
            def show(message, category, filename, lineno, file=None, line=None):
                text = _one_line(message)
                if text.startswith(f"{PROG}: "):
                    text = text[len(PROG) + 2:]
                print(f"{PROG}: note: {text}", file=sys.stderr, flush=True)

            warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line (``argv`` defaults to ``sys.argv[1:]``); returns 0 on success
    and raises ``SystemExit(2)`` on a user error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(os.environ.get("FASTMETA_DEBUG"))
    try:
        with _one_line_warnings(getattr(args, "quiet", False)):
            return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except BrokenPipeError:
        # stdout's reader left (`fastmeta train | head`): nothing more to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except (MemoryError, RuntimeError) as error:
        if debug or not (isinstance(error, MemoryError) or "allocate" in str(error)):
            raise
        fail(f"out of memory ({_one_line(error) or 'MemoryError'}): use smaller sizes "
             f"(--meta-batch, --eval-tasks, --val-tasks, --shots, --image-size)")
    except (ValueError, TypeError, FloatingPointError, OSError) as error:
        # User errors: bad arguments the library rejected, missing or corrupt files, an
        # unwritable output directory, a diverging run.
        if debug:
            raise
        fail(str(error) or type(error).__name__)
    return 0  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
