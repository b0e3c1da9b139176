"""N-way K-shot classification of handwritten characters, end to end: ``fastmeta train
digits|omniglot|folder``.

Meta-trains any of MAML, first-order MAML, Reptile, Meta-SGD, ANIL, Prototypical Networks
and Relation Networks on tasks drawn from the training classes, validates periodically on
held-out training classes, checkpoints (exact resume), and finally evaluates on
``eval_tasks`` (600) new tasks from the test classes, never seen in training: the query
accuracy as mean ± 95% confidence interval, beside two baselines that show what
meta-learning buys:

* **scratch**: the same network, freshly initialised, trained on each task's support set;
* **pretrained**: the same network trained by ordinary supervised classification over all
  meta-training classes (``baseline_steps`` Adam steps), its head then replaced by a
  zero-initialised N-way head and fine-tuned on each task's support set (all layers or the
  head only).

Both fine-tune with full-batch Adam steps, tuned as a baseline should be (Chen et al. 2019,
"A closer look at few-shot classification", fine-tune for 100 iterations): the number of
steps from :data:`FINETUNE_STEP_GRID`, the step size from :data:`FINETUNE_LRS` and,
pretrained, whether all layers or only the head are tuned, all chosen on validation tasks
from the held-out training classes, so the test classes stay unseen by everything. A fixed
``finetune_steps`` (``--finetune-steps``) replaces the step grid, e.g. the meta-learner's own
adaptation steps for the MAML paper's same-budget comparison.

Data: ``digits`` (embedded, 8x8: digits 0-5 for training, of which two digits -- eight
classes with their rotations -- are held out for validation, and the other 16 training
classes' mirror images are training classes too (``augment="flip"``); digits 6-9 for
testing),
``omniglot`` (the MAML/Vinyals split at 28x28; 100 of the 1,200 training characters
held out for validation) and ``folder`` (a folder of class sub-folders, split by class:
20% test, 10% validation).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastmeta
from fastmeta import checkpoint as ckpt
from fastmeta.data import DataError, Digits, ImageFolderTasks, Omniglot, TaskSampler, split_classes
from fastmeta.data.images import ClassDataset
from fastmeta.experiments import training
from fastmeta.experiments.training import read_metrics, write_results
from fastmeta.losses import per_task_loss
from fastmeta.stats import format_ci, mean_ci

NAME = "classification"
DATASETS = ("digits", "omniglot", "folder")
GRADIENT = ("maml", "fomaml", "reptile", "metasgd", "anil")
METRIC = ("protonet", "relationnet")
ALGORITHMS = GRADIENT + METRIC
MODELS = ("mlp", "conv")
AUGMENTATIONS = ("none", "flip")
ENV = "FASTMETA_DATA"

#: every run option (``None``: the dataset's or algorithm's default, see :func:`make_config`)
DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "data": None,            # omniglot / folder: the data path (default $FASTMETA_DATA)
    "algorithm": "maml",
    "model": None,           # "mlp" or "conv" (the dataset's default)
    "augment": None,         # "flip": mirror images of the training classes as new classes
    "image_size": None,      # omniglot / folder: images resized to this (28)
    "ways": 5,
    "train_ways": None,      # protonet / relationnet may train with more ways (default: ways)
    "shots": 1,
    "queries": None,         # query images per class in training tasks
    "eval_queries": None,    # query images per class in validation and test tasks
    "meta_batch": None,
    "inner_lr": None,
    "inner_steps": None,
    "eval_steps": None,      # adaptation steps at validation and test time
    "outer_lr": None,
    "lr_halve_every": None,  # halve the outer learning rate every this many iterations
    "iterations": None,
    "seed": 0,
    "device": "cpu",
    "backend": "auto",
    "output": None,          # runs/<dataset>-<algorithm>
    "eval_tasks": 600,
    "val_every": None,
    "val_tasks": 100,
    "log_every": None,
    "checkpoint_every": None,
    "baseline_steps": None,
    "finetune_steps": None,  # the baselines' Adam steps on each support set (None: chosen
                             # from FINETUNE_STEP_GRID on validation tasks)
    "threads": 1,            # torch intra-op threads (not a run option)
}

#: per-dataset defaults of the options DEFAULTS leaves open
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"model": "conv", "augment": "flip", "queries": 15, "eval_queries": 15,
               "meta_batch": 16, "inner_lr": 0.4, "inner_steps": 1, "eval_steps": 3,
               "outer_lr": 1e-3, "iterations": 800, "val_every": 100, "log_every": 20,
               "checkpoint_every": 100, "baseline_steps": 1000},
    "omniglot": {"model": "conv", "augment": "none", "image_size": 28, "queries": 5,
                 "eval_queries": 15, "meta_batch": 32, "inner_lr": 0.4, "inner_steps": 1,
                 "eval_steps": 3, "outer_lr": 1e-3,
                 "iterations": 2000, "val_every": 250, "log_every": 50,
                 "checkpoint_every": 250, "baseline_steps": 2000},
    "folder": {"model": "conv", "augment": "none", "image_size": 28, "queries": 5,
               "eval_queries": 5, "meta_batch": 16, "inner_lr": 0.4, "inner_steps": 1,
               "eval_steps": 3, "outer_lr": 1e-3,
               "iterations": 2000, "val_every": 250, "log_every": 50,
               "checkpoint_every": 250, "baseline_steps": 1000},
}

#: per-algorithm defaults over the dataset's (``"*"``: any dataset)
ALGORITHM_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("*", "reptile"): {"inner_steps": 5, "inner_lr": 0.1, "eval_steps": 10},
    ("*", "metasgd"): {"inner_lr": 0.1},
    ("*", "protonet"): {"meta_batch": 1},
    ("*", "relationnet"): {"meta_batch": 1},
    ("omniglot", "protonet"): {"meta_batch": 1, "train_ways": 60, "lr_halve_every": 2000,
                               "iterations": 800, "val_every": 200, "checkpoint_every": 200},
}

# Options that define a run; resuming with a different value is an error.
RUN_OPTIONS = ("dataset", "algorithm", "model", "augment", "image_size", "ways", "train_ways", "shots",
               "queries", "meta_batch", "inner_lr", "inner_steps", "outer_lr",
               "lr_halve_every", "seed", "backend", "log_every", "checkpoint_every", "val_every",
               "val_tasks")
CHANGEABLE_ON_RESUME = training.CHANGEABLE_ON_RESUME + ("data", "eval_steps", "eval_queries",
                                                         "finetune_steps", "threads")

# Evaluation protocol.
# The baselines' fine-tuning budgets and step sizes, chosen on validation tasks. On the
# default digits run the baselines gain ~8 points from 3 steps (MAML's adaptation) to 50-100
# steps (benchmarks/RESULTS.md); one run of the largest budget scores every smaller one.
FINETUNE_STEP_GRID = (20, 50, 100)
FINETUNE_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
PRETRAIN_BATCH = 64
PRETRAIN_LR = 1e-3
EVAL_CHUNK = 50
BASELINE_VAL_TASKS = 50      # validation tasks choosing the baselines' fine-tuning setting
# Seed streams apart from the training tasks (TaskSampler(seed=config["seed"])): the test
# tasks are the same for every run; validation tasks, the baselines' initial weights and
# pretraining batches have their own.
TEST_SEED = 1_000_003
VALIDATION_SEED = 2_000_003
BASELINE_SEED_OFFSET = 3_000_003
SPLIT_SEED = 0
DIGITS_VALIDATION_DIGITS = 2
OMNIGLOT_VALIDATION_CHARACTERS = 100
FOLDER_TEST_FRACTION = 0.2
FOLDER_VALIDATION_FRACTION = 0.125   # of the rest: 10% of all classes

METRICS_FILE = training.METRICS_FILE
RESULTS_FILE = training.RESULTS_FILE
TASK_PLOT = "test_task.png"
LEARNING_CURVE_PLOT = "learning_curve.png"
BASELINE_FILE = "baseline.pt"


# Configuration ------------------------------------------------------------------------------
def make_config(options: dict[str, Any]) -> dict[str, Any]:
    """The full run configuration: ``options`` (``None`` = default) over the algorithm's,
    the dataset's and the common :data:`DEFAULTS`."""
    given = {k: v for k, v in options.items() if v is not None and k in DEFAULTS}
    dataset = given.get("dataset", DEFAULTS["dataset"])
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    algorithm = given.get("algorithm", DEFAULTS["algorithm"])
    if algorithm not in ALGORITHMS:
        raise ValueError(f"argument --algorithm: unknown algorithm {algorithm!r}; choose from "
                         f"{', '.join(ALGORITHMS)}")
    config = {k: v for k, v in DEFAULTS.items()}
    config.update(DATASET_DEFAULTS[dataset])
    config.update(ALGORITHM_DEFAULTS.get(("*", algorithm), {}))
    config.update(ALGORITHM_DEFAULTS.get((dataset, algorithm), {}))
    config.update(given)
    config["dataset"], config["algorithm"] = dataset, algorithm
    if config["train_ways"] is None:
        config["train_ways"] = config["ways"]
    if "eval_steps" not in given and isinstance(config["inner_steps"], int):
        # at least as many steps at test time as in training
        config["eval_steps"] = max(config["eval_steps"] or 0, config["inner_steps"])
    if config["output"] is None:
        config["output"] = os.path.join("runs", f"{dataset}-{algorithm}")
    config["output"] = str(config["output"])
    if config["data"] is None and dataset != "digits":
        config["data"] = os.environ.get(ENV) or None
    if config["data"] is not None:
        if not isinstance(config["data"], (str, os.PathLike)):
            raise ValueError(f"--data must be a path, got {config['data']!r}")
        config["data"] = str(config["data"])
    if config["model"] not in MODELS:
        raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {config['model']!r}")
    if config["augment"] not in AUGMENTATIONS:
        raise ValueError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got "
                         f"{config['augment']!r}")
    for key in ("ways", "train_ways", "shots", "queries", "eval_queries", "meta_batch",
                "inner_steps", "iterations", "eval_tasks", "val_every", "val_tasks",
                "log_every", "checkpoint_every", "baseline_steps", "threads"):
        training.require_positive_int(config, key)
    if config["finetune_steps"] is not None:
        training.require_positive_int(config, "finetune_steps")
    if isinstance(config["eval_steps"], bool) or not isinstance(config["eval_steps"], int) \
            or config["eval_steps"] < 0:
        raise ValueError(f"--eval-steps must be a non-negative integer, got {config['eval_steps']!r}")
    if config["lr_halve_every"] is not None:
        training.require_positive_int(config, "lr_halve_every")
    if config["image_size"] is not None:
        training.require_positive_int(config, "image_size")
        if dataset == "digits":
            raise ValueError("--image-size does not apply to digits (8x8 images)")
        if config["image_size"] < 2 and config["model"] == "conv":
            raise ValueError("--image-size must be at least 2 for the conv network (one "
                             "conv-pool block halves it)")
    if dataset == "digits" and config["data"] is not None:
        raise ValueError("--data does not apply to digits (scikit-learn's embedded images)")
    for key in ("inner_lr", "outer_lr"):
        training.require_positive_number(config, key)
    if config["ways"] < 2 or config["train_ways"] < 2:
        raise ValueError(f"--ways must be at least 2 (a task tells classes apart), got "
                         f"{min(config['ways'], config['train_ways'])}")
    if config["train_ways"] != config["ways"] and algorithm in GRADIENT:
        raise ValueError(f"--train-ways applies to protonet and relationnet only: {algorithm}'s "
                         f"network has one output per way, so it trains and tests "
                         f"{config['ways']}-way")
    return config


# Data ---------------------------------------------------------------------------------------
class Splits(NamedTuple):
    train: ClassDataset       # meta-training classes
    val: ClassDataset         # held-out training classes, for validation
    test: ClassDataset        # the test classes, never seen in training
    description: str


def _data_from_environment(config: dict[str, Any]) -> None:
    """A saved run (``--resume``, ``fastmeta eval``) whose data path is gone takes
    ``$FASTMETA_DATA`` instead, as the missing-data message advises."""
    saved = config.get("data")
    if config["dataset"] != "digits" and os.environ.get(ENV) and (
            not saved or not Path(saved).expanduser().exists()):
        config["data"] = os.environ[ENV]


def _data_root(config: dict[str, Any]) -> Path:
    what = {"omniglot": "the folder holding images_background.zip and images_evaluation.zip",
            "folder": "a folder with one sub-folder of images per class"}[config["dataset"]]
    if not config.get("data"):
        raise DataError(f"{config['dataset']} needs its data: pass --data PATH ({what}) or set "
                        f"{ENV}")
    root = Path(config["data"]).expanduser()
    if not root.exists():
        raise DataError(f"no {config['dataset']} data at {root}: the path does not exist "
                        f"(expected {what}); pass --data PATH or set {ENV}")
    return root


def _cli_message(error: DataError) -> DataError:
    return DataError(str(error).replace("pass root=", "pass --data PATH"))


def with_flips(data: ClassDataset) -> ClassDataset:
    """``data`` plus the mirror image (left-right flip) of every class as a class of its own,
    as the rotations make new classes: twice the classes to meta-train on."""
    names = None if data.class_names is None else \
        list(data.class_names) + [f"{name}/flip" for name in data.class_names]
    return ClassDataset(torch.cat([data.pixels, data.pixels.flip(-1)]),
                        torch.cat([data.labels, data.labels + data.num_classes]),
                        2 * data.num_classes, torch.cat([data.groups, data.groups]), names)


def load_splits(config: dict[str, Any]) -> Splits:
    """The training, validation and test class datasets of ``config["dataset"]``; with
    ``config["augment"] == "flip"`` the training classes' mirror images are training classes
    too (validation and test classes stay as they are)."""
    splits = _load_splits(config)
    if config.get("augment") == "flip":
        splits = Splits(with_flips(splits.train), splits.val, splits.test,
                        f"{splits.description}; the training classes' mirror images are "
                        f"training classes too ({2 * splits.train.num_classes} in all)")
    return splits


def _load_splits(config: dict[str, Any]) -> Splits:
    dataset = config["dataset"]
    if dataset == "digits":
        full = Digits("train")
        train, val = split_classes(full, DIGITS_VALIDATION_DIGITS, seed=SPLIT_SEED)
        held = sorted({name.split("/")[0] for name in val.class_names})
        return Splits(train, val, Digits("test"),
                      f"digits 0-5 for training ({train.num_classes} classes; digits "
                      f"{' and '.join(held)} held out for validation, {val.num_classes} classes), "
                      f"digits 6-9 for testing ({Digits.__name__} test split, 16 classes); "
                      f"each digit rotated by 0/90/180/270 degrees is a class")
    root = _data_root(config)
    size = config["image_size"]
    try:
        if dataset == "omniglot":
            full = Omniglot(root, "train", image_size=size)
            test = Omniglot(root, "test", image_size=size)
            train, val = split_classes(full, OMNIGLOT_VALIDATION_CHARACTERS, seed=SPLIT_SEED)
            return Splits(train, val, test,
                          f"Omniglot, MAML/Vinyals split at {size}x{size}: "
                          f"{len(full.characters) - OMNIGLOT_VALIDATION_CHARACTERS} characters for "
                          f"training ({train.num_classes} classes with rotations), "
                          f"{OMNIGLOT_VALIDATION_CHARACTERS} held out for validation, "
                          f"{len(test.characters)} for testing ({test.num_classes} classes)")
        full = ImageFolderTasks(root, image_size=size)
    except DataError as error:
        raise _cli_message(error) from None
    groups = len(torch.unique(full.groups))
    if groups < 6:
        raise DataError(f"the image folder {root} has {groups} classes; it needs at least 6 "
                        f"(split into training, validation and test classes, 2 or more each)")
    rest, test = split_classes(full, max(2, round(FOLDER_TEST_FRACTION * groups)), seed=SPLIT_SEED)
    rest_groups = len(torch.unique(rest.groups))
    train, val = split_classes(rest, max(2, min(rest_groups - 2, round(
        FOLDER_VALIDATION_FRACTION * rest_groups))), seed=SPLIT_SEED + 1)
    return Splits(train, val, test,
                  f"image folder {root}: {full.num_classes} classes at {size}x{size}, "
                  f"{train.num_classes} for training, {val.num_classes} for validation, "
                  f"{test.num_classes} for testing")


def check_task_sizes(config: dict[str, Any], splits: Splits) -> None:
    """Clear errors for tasks the data cannot make: more ways than classes, or more shots
    plus queries than images in a class."""
    dataset = config["dataset"]
    needs = (("test", splits.test, config["ways"], config["eval_queries"], "--ways",
              "--eval-queries"),
             ("validation", splits.val, config["ways"], config["eval_queries"], "--ways",
              "--eval-queries"),
             ("training", splits.train, config["train_ways"], config["queries"],
              "--train-ways" if config["train_ways"] != config["ways"] else "--ways", "--queries"))
    for role, data, ways, queries, ways_option, queries_option in needs:
        if ways > data.num_classes:
            raise ValueError(f"{ways_option} {ways} is more than the {data.num_classes} "
                             f"{role} classes of {dataset}")
        smallest = int(data.class_sizes.min())
        if config["shots"] + queries > smallest:
            raise ValueError(f"--shots {config['shots']} + {queries_option} {queries} = "
                             f"{config['shots'] + queries} images per class, but some {dataset} "
                             f"{role} classes have only {smallest} image{'' if smallest == 1 else 's'}")
    # The validation and test tasks are built up front, and a meta-batch at once: refuse
    # sizes whose images alone would fill half the machine's memory, rather than swap or die.
    image_bytes = 4 * math.prod(splits.train.image_shape)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for option, tasks, ways, queries in (
            ("--eval-tasks", config["eval_tasks"], config["ways"], config["eval_queries"]),
            ("--val-tasks", config["val_tasks"], config["ways"], config["eval_queries"]),
            ("--meta-batch", config["meta_batch"], config["train_ways"], config["queries"])):
        need = tasks * ways * (config["shots"] + queries) * image_bytes
        if need > memory // 2:
            raise ValueError(f"{option} {tasks} needs {need / 2**30:,.1f} GiB for its images "
                             f"alone; this machine has {memory / 2**30:,.1f} GiB: use fewer")


# Models -------------------------------------------------------------------------------------
def _conv_blocks(image_size: int) -> int:
    """Conv blocks (each halving the image) for ``image_size``: 4 (conv4) down to 1 pixel
    or for 16 and more; 3 for 8x8 digits."""
    blocks, size = 0, image_size
    while blocks < 4 and size >= 2:
        blocks, size = blocks + 1, size // 2
    return blocks


def network(config: dict[str, Any], image_shape: Sequence[int], outputs: int) -> nn.Sequential:
    """The classifier: ``mlp`` (``Flatten``, Linear-ReLU x2, Linear; runs on the compiled
    MLP engine) or ``conv`` (conv3x3-BatchNorm-ReLU-maxpool blocks, Flatten, Linear; conv4
    with 64 filters at 28x28 as in the MAML paper, 3 blocks of 32 filters for 8x8 digits).
    The weights come from torch's global RNG."""
    channels, height, width = image_shape
    if config["model"] == "mlp":
        hidden = 128 if height * width <= 64 else 256
        return nn.Sequential(nn.Flatten(), *fastmeta.models.mlp(
            [channels * height * width, hidden, hidden, outputs]))
    size = min(height, width)
    blocks = _conv_blocks(size)
    if blocks == 4:
        return fastmeta.models.conv4(channels, outputs, 64, size)
    hidden = 32
    layers, c = [], channels
    for _ in range(blocks):
        layers += [nn.Conv2d(c, hidden, 3, padding=1),
                   nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
        c, size = hidden, size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden * size * size, outputs))


def _batch_statistics(module: nn.Module) -> nn.Module:
    """Batch norm with the current batch's statistics everywhere (no running statistics),
    as in the MAML reference code; training and evaluation then normalise alike."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.track_running_stats = False
            layer.running_mean = None
            layer.running_var = None
            layer.num_batches_tracked = None
    return module


def build(config: dict[str, Any], image_shape: Sequence[int]) -> tuple[nn.Module, nn.Module]:
    """``(network, learner)`` on ``config["device"]``: the network whose weights are
    learned (the classifier, the ProtoNet encoder, or the whole Relation Network) and the
    algorithm wrapper around it. Weights come from torch's global RNG."""
    device = torch.device(config["device"])
    name, ways = config["algorithm"], config["ways"]
    lr, steps, backend = config["inner_lr"], config["inner_steps"], config["backend"]
    if name == "relationnet":
        learner = fastmeta.RelationNet.build(image_shape[0], min(image_shape[1:]))
        _batch_statistics(learner)
        return learner.to(device), learner.to(device)
    model = network(config, image_shape, ways)
    if name == "protonet":
        encoder = nn.Sequential(*list(model)[:-1])   # without the head
        learner = fastmeta.ProtoNet(encoder)
        return encoder.to(device), learner.to(device)
    if name == "maml":
        learner = fastmeta.MAML(model, lr, steps, loss="cross_entropy", backend=backend)
    elif name == "fomaml":
        learner = fastmeta.MAML(model, lr, steps, first_order=True, loss="cross_entropy",
                                backend=backend)
    elif name == "metasgd":
        learner = fastmeta.MetaSGD(model, inner_lr_init=lr, inner_steps=steps,
                                   loss="cross_entropy", backend=backend)
    elif name == "anil":
        learner = fastmeta.ANIL(model, inner_lr=lr, inner_steps=steps, loss="cross_entropy",
                                backend=backend)
    elif name == "reptile":
        learner = fastmeta.Reptile(model, lr, steps, loss="cross_entropy", backend=backend)
    else:  # pragma: no cover - make_config checked it
        raise ValueError(f"unknown algorithm {name!r}")
    return model.to(device), learner.to(device)


def predict(learner: nn.Module, support_x: Tensor, support_y: Tensor, query_x: Tensor,
            steps: int) -> Tensor:
    """Query scores ``[T, Q, N]`` of the learner adapted to each task (no meta-gradient):
    ``steps`` SGD steps for the gradient-based algorithms; class prototypes or relation
    scores for the metric learners."""
    with torch.no_grad():
        if isinstance(learner, (fastmeta.ProtoNet, fastmeta.RelationNet)):
            return learner.predict(support_x, support_y, query_x)
        return learner.adapt(support_x, support_y, steps)(query_x)


def task_accuracy(scores: Tensor, labels: Tensor) -> Tensor:
    """Per-task query accuracy ``[T]``."""
    return (scores.argmax(-1) == labels).to(torch.float64).mean(1).cpu()


def meta_step_loss(learner: nn.Module, tasks) -> Tensor:
    """One meta-batch's training loss (its ``backward`` gives the meta-gradient). Reptile
    adapts on the support and query images together (its "train shots")."""
    sx, sy, qx, qy = tasks
    if isinstance(learner, fastmeta.Reptile):
        return learner(torch.cat([sx, qx], 1), torch.cat([sy, qy], 1))
    return learner(sx, sy, qx, qy)


def adaptation_note(config: dict[str, Any]) -> str:
    name, lr, steps = config["algorithm"], config["inner_lr"], config["eval_steps"]
    plural = "s" if steps != 1 else ""
    if name == "protonet":
        return "classifies queries by the nearest class mean of the support embeddings"
    if name == "relationnet":
        return "scores each query against each class with its learned relation module"
    if name == "metasgd":
        return f"adapts with {steps} step{plural} of its learned per-weight step sizes"
    if name == "anil":
        return f"adapts the head only, {steps} SGD step{plural} of size {lr:g}"
    return f"adapts all weights, {steps} SGD step{plural} of size {lr:g}"


# Training -----------------------------------------------------------------------------------
def _validation_tasks(config: dict[str, Any], splits: Splits, device) -> list:
    sampler = TaskSampler(splits.val, config["ways"], config["shots"], config["eval_queries"],
                          min(EVAL_CHUNK, config["val_tasks"]), seed=VALIDATION_SEED,
                          device=device)
    chunks, left = [], config["val_tasks"]
    while left > 0:
        chunks.append(sampler.sample(min(EVAL_CHUNK, left)))
        left -= EVAL_CHUNK
    return chunks


def _first_tasks(chunks: Sequence, count: int) -> list:
    """The first ``count`` tasks of a list of task batches."""
    out, left = [], count
    for chunk in chunks:
        if left <= 0:
            break
        out.append(type(chunk)(*(t[:left] for t in chunk)))
        left -= chunk.support_x.shape[0]
    return out


def accuracy_on(learner: nn.Module, chunks: Sequence, steps: int) -> Tensor:
    """Per-task query accuracy over a list of task batches."""
    return torch.cat([task_accuracy(predict(learner, c.support_x, c.support_y, c.query_x, steps),
                                    c.query_y) for c in chunks])


def train(config: dict[str, Any], resume: bool = False, quiet: bool = False,
          evaluate_after: bool = True, stream: TextIO | None = None,
          results_stream: TextIO | None = None, explicit: Sequence[str] = (),
          threads: int | None = None) -> dict[str, Any]:
    """Meta-trains ``config["algorithm"]`` on ``config["dataset"]``, checkpointing to
    ``<output>/checkpoint.pt`` and logging to ``<output>/metrics.jsonl`` (training loss and
    accuracy, validation accuracy); then (unless ``evaluate_after`` is False) evaluates it
    and the baselines on new test tasks, writes ``results.json`` and the plots, and prints
    the results table to ``results_stream`` (stdout by default).

    ``resume=True`` continues from the checkpoint in ``<output>`` with the final weights
    bit-identical to an uninterrupted run's (also after a ``kill -9``: the checkpoint is
    written atomically). The run's options come from the checkpoint; of those named in
    ``explicit`` (given by the user), the run-defining ones must agree with it and the others
    (``iterations``, ``device``, evaluation settings, ...) replace the checkpoint's.
    ``threads``: torch intra-op threads (default: all for conv networks, 1 for MLPs).
    Returns the results (or, without evaluation, ``{"iteration": ..., "output": ...}``).
    """
    results_stream = sys.stdout if results_stream is None else results_stream
    run = training.Run(config, dataset=DATASETS, run_options=RUN_OPTIONS, resume=resume,
                       quiet=quiet, explicit=explicit, stream=stream,
                       changeable=CHANGEABLE_ON_RESUME, keep_saved=True)
    config = run.config
    if resume and "data" not in explicit:
        _data_from_environment(config)
    splits = load_splits(config)
    check_task_sizes(config, splits)
    device = torch.device(config["device"])
    with training.threads(_threads(config, threads)), _quiet_expected_fallback(config):
        torch.manual_seed(config["seed"])
        model, learner = build(config, splits.train.image_shape)
        optimizer = torch.optim.Adam(learner.parameters(), lr=config["outer_lr"])
        scheduler = None
        if config["lr_halve_every"]:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config["lr_halve_every"], 0.5)
        sampler = TaskSampler(splits.train, config["train_ways"], config["shots"],
                              config["queries"], config["meta_batch"], seed=config["seed"],
                              device=device)
        run.attach(model=model, algorithm=learner, optimizer=optimizer, sampler=sampler,
                   scheduler=scheduler)
        validation = _validation_tasks(config, splits, device)
        accuracy_every = max(1, config["log_every"] // 5)

        def step(iteration: int) -> dict[str, float]:
            tasks = sampler.sample()
            accuracy = None
            if iteration % accuracy_every == 0:   # the query accuracy before this update
                scores = predict(learner, tasks.support_x, tasks.support_y, tasks.query_x,
                                 config["inner_steps"])
                accuracy = float(task_accuracy(scores, tasks.query_y).mean())
            loss = meta_step_loss(learner, tasks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            return {"loss": float(loss.detach()), "accuracy": accuracy}

        def validate(iteration: int) -> dict[str, float]:
            mean, ci = mean_ci(accuracy_on(learner, validation, config["eval_steps"]))
            return {"val_accuracy": mean, "val_ci95": ci}

        def extra_record() -> dict[str, float]:
            record = {"outer_lr": optimizer.param_groups[0]["lr"]}
            if isinstance(learner, fastmeta.MetaSGD):
                record["mean_inner_lr"] = float(torch.cat(
                    [p.detach().reshape(-1) for p in learner.inner_lrs]).mean())
            return record

        final_iteration = run.train(step, meta_batch=config["meta_batch"], validate=validate,
                                    validate_every=config["val_every"],
                                    extra_record=extra_record)
        if not evaluate_after:
            return {"iteration": final_iteration, "output": str(run.output)}
        return _evaluate_and_report(config, splits, learner, run.output, final_iteration,
                                    run.elapsed, results_stream, run.metrics_path,
                                    quiet=quiet, stream=run.stream)


def _threads(config: dict[str, Any], threads: int | None) -> int | None:
    """torch's intra-op threads for the run: ``threads``, else ``config["threads"]`` (1 by
    default: the networks here are small, and on a busy machine extra threads spin-wait for
    several times their worth)."""
    return threads if threads is not None else config.get("threads", 1)


@contextlib.contextmanager
def _quiet_expected_fallback(config: dict[str, Any]):
    """Hides the "using the torch reference engine" note where it is expected (a conv
    network under ``backend="auto"``: the compiled engine serves MLPs)."""
    with warnings.catch_warnings():
        if config["backend"] == "auto" and config["model"] == "conv":
            warnings.filterwarnings("ignore", message=".*using the torch reference engine "
                                    "because unsupported layer", category=RuntimeWarning)
        yield


def _evaluate_and_report(config, splits, learner, output: Path, iteration: int, elapsed: float,
                         results_stream: TextIO, metrics_path: Path | None, quiet: bool = True,
                         stream: TextIO | None = None, seed: int | None = None,
                         baseline_cache: Path | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    results = evaluate(learner, config, splits, seed=TEST_SEED if seed is None else seed,
                       baseline_cache=output / BASELINE_FILE if baseline_cache is None
                       else baseline_cache, quiet=quiet, stream=stream,
                       plot_path=output / TASK_PLOT)
    results.update(run_summary(config, iteration, elapsed, splits))
    results["eval_seconds"] = time.perf_counter() - start
    write_results(output / RESULTS_FILE, results)
    plots = [output / TASK_PLOT]
    if metrics_path is not None and plot_learning_curves(
            metrics_path, output / LEARNING_CURVE_PLOT,
            title=f"{config['dataset']}: {config['algorithm']} {config['ways']}-way "
                  f"{config['shots']}-shot meta-training") is not None:
        plots.append(output / LEARNING_CURVE_PLOT)
    print(format_table(results), file=results_stream, flush=True)
    print(f"results: {output / RESULTS_FILE}; plots: {', '.join(map(str, plots))}",
          file=results_stream, flush=True)
    return results


def run_summary(config: dict[str, Any], iteration: int, elapsed: float,
                splits: Splits) -> dict[str, Any]:
    return {"dataset": config["dataset"], "algorithm": config["algorithm"],
            "iterations": iteration, "train_seconds": elapsed, "config": dict(config),
            "data": splits.description, "adaptation": adaptation_note(config)}


def evaluate_checkpoint(state: dict[str, Any], output: str | os.PathLike | None = None,
                        eval_tasks: int | None = None, seed: int | None = None,
                        device: str | None = None, baseline_steps: int | None = None,
                        results_stream: TextIO | None = None,
                        metrics_path: str | os.PathLike | None = None,
                        data: str | None = None, finetune_steps: int | None = None,
                        threads: int | None = None) -> dict[str, Any]:
    """``fastmeta eval``: rebuilds the checkpoint's learner, evaluates it and the baselines
    on new test tasks, prints the table and writes ``results.json`` and the plots to
    ``output`` (the learning curves too, given the run's ``metrics_path``)."""
    results_stream = sys.stdout if results_stream is None else results_stream
    config = dict(state["config"])
    if data is not None and config["dataset"] == "digits":
        raise ValueError("--data does not apply to digits (scikit-learn's embedded images)")
    for key, value in (("device", device), ("eval_tasks", eval_tasks),
                       ("baseline_steps", baseline_steps), ("data", data),
                       ("finetune_steps", finetune_steps)):
        if value is not None:
            config[key] = value
    if data is None:
        _data_from_environment(config)
    output = Path(config["output"] if output is None else output)
    splits = load_splits(config)
    check_task_sizes(config, splits)
    with training.threads(_threads(config, threads)), _quiet_expected_fallback(config):
        with torch.random.fork_rng(devices=[]):
            _, learner = build(config, splits.train.image_shape)
        try:
            learner.load_state_dict(state["algorithm"])
        except (KeyError, RuntimeError) as error:
            raise ckpt.CheckpointError(
                f"the checkpoint's weights do not fit a {config['algorithm']} "
                f"{config['dataset']} model ({str(error).splitlines()[0]})") from None
        output.mkdir(parents=True, exist_ok=True)
        # The run's pretrained baseline, when it was written beside the checkpoint.
        run_dir = Path(metrics_path).parent if metrics_path is not None else Path(config["output"])
        cache = run_dir / BASELINE_FILE
        if not cache.exists():
            cache = output / BASELINE_FILE
        return _evaluate_and_report(config, splits, learner, output,
                                    int(state["iteration"]), float(state.get("elapsed", 0.0)),
                                    results_stream,
                                    Path(metrics_path) if metrics_path is not None else None,
                                    seed=seed, baseline_cache=cache)


# Baselines ----------------------------------------------------------------------------------
def baseline_network(config: dict[str, Any], image_shape: Sequence[int], outputs: int) -> nn.Sequential:
    """"The same network" as a plain classifier: the gradient-based algorithms' network; the
    ProtoNet encoder (the same conv/MLP body) or the Relation Network's encoder, with a
    linear head of ``outputs`` classes."""
    if config["algorithm"] == "relationnet":
        encoder = fastmeta.metric.relation_encoder(
            image_shape[0], 64, 0 if min(image_shape[1:]) >= 28 else 1)
        _batch_statistics(encoder)
        with torch.no_grad():
            features = encoder(torch.zeros(2, *image_shape)).flatten(1).shape[1]
        return nn.Sequential(*encoder, nn.Flatten(), nn.Linear(features, outputs))
    return network(config, image_shape, outputs)


def _with_new_head(model: nn.Sequential, ways: int) -> nn.Sequential:
    """A copy of ``model`` whose last Linear layer is replaced by a zero-initialised
    ``ways``-output one (so fine-tuning starts from uniform predictions)."""
    layers = list(model)
    head = layers[-1]
    new = nn.Linear(head.in_features, ways).to(head.weight.device)
    nn.init.zeros_(new.weight)
    nn.init.zeros_(new.bias)
    return nn.Sequential(*[copy.deepcopy(layer) for layer in layers[:-1]], new)


def _per_task_forward(model: nn.Module) -> Callable[[Sequence[Tensor], Tensor], Tensor]:
    """``forward(weights, x)``: ``model`` run with per-task weights ``[T, *shape]`` on inputs
    ``[T, S, *in]``, all tasks at once (``torch.func.vmap``; batch norm per task)."""
    names = [name for name, _ in model.named_parameters()]

    def one(weights, x):
        return torch.func.functional_call(model, dict(zip(names, weights)), (x,))

    return torch.func.vmap(one)


def finetune_scores(model: nn.Sequential, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                    lr: float, steps: int = FINETUNE_STEP_GRID[-1], head_only: bool = False
                    ) -> Tensor:
    """Trains a copy of ``model`` on every task's support set at once (per-task weights;
    Adam, ``steps`` full-batch steps of step size ``lr``; all layers, or only the last
    layer -- then on features computed once) and returns the query scores ``[T, Q, N]``."""
    return finetune_scores_at(model, support_x, support_y, query_x, lr, (steps,), head_only)[steps]


def finetune_scores_at(model: nn.Sequential, support_x: Tensor, support_y: Tensor,
                       query_x: Tensor, lr: float, steps: Sequence[int], head_only: bool = False
                       ) -> dict[int, Tensor]:
    """:func:`finetune_scores` after each number of ``steps``, from one run of the largest
    (the same numbers as separate runs: the query scores leave the training untouched)."""
    tasks = support_x.shape[0]
    if head_only:
        body, head = nn.Sequential(*list(model)[:-1]), nn.Sequential(list(model)[-1])
        with torch.no_grad():
            support_x = _per_task_forward(body)(
                [p.unsqueeze(0).expand(tasks, *p.shape) for p in body.parameters()], support_x)
            query_x = _per_task_forward(body)(
                [p.unsqueeze(0).expand(tasks, *p.shape) for p in body.parameters()], query_x)
        model = head
    forward = _per_task_forward(model)
    fast = [p.detach().unsqueeze(0).repeat(tasks, *([1] * p.dim())).requires_grad_()
            for p in model.parameters()]
    optimizer = torch.optim.Adam(fast, lr=lr)
    scores, last = {}, max(steps)
    for step in range(last + 1):
        if step in steps:
            with torch.no_grad():
                scores[step] = forward([w.detach() for w in fast], query_x)
        if step == last:
            return scores
        with torch.enable_grad():
            losses = per_task_loss("cross_entropy", forward(fast, support_x), support_y)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()


def pretrain(config: dict[str, Any], data: ClassDataset, steps: int, seed: int,
             device: torch.device, quiet: bool = True, stream: TextIO | None = None) -> nn.Sequential:
    """The baseline network trained by ordinary supervised classification over all of
    ``data``'s classes (Adam, ``steps`` steps of :data:`PRETRAIN_BATCH` images). Leaves
    torch's global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = baseline_network(config, data.image_shape, data.num_classes).to(device)
    generator = torch.Generator().manual_seed(seed)
    pixels, labels, scale = data.pixels, data.labels, data.scale
    optimizer = torch.optim.Adam(model.parameters(), lr=PRETRAIN_LR)
    report = time.monotonic()
    with torch.enable_grad():
        for i in range(steps):
            index = torch.randint(0, len(labels), (PRETRAIN_BATCH,), generator=generator)
            x = (pixels[index].to(torch.float32) * scale).to(device)
            loss = F.cross_entropy(model(x), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not quiet and stream is not None and time.monotonic() - report > 15:
                report = time.monotonic()
                print(f"fastmeta: pretraining the baseline: step {i + 1}/{steps}  "
                      f"loss {float(loss.detach()):.4f}", file=stream, flush=True)
    return model


def _pretrained_baseline(config, splits, device, cache: Path | None, quiet, stream) -> nn.Sequential:
    """The pretrained baseline network, from ``cache`` when it holds this configuration's."""
    key = {"dataset": config["dataset"], "data": config.get("data"), "model": config["model"],
           "algorithm_family": "relationnet" if config["algorithm"] == "relationnet" else "net",
           "image_size": config.get("image_size"), "classes": splits.train.num_classes,
           "images": len(splits.train), "seed": config["seed"],
           "steps": config["baseline_steps"], "batch": PRETRAIN_BATCH, "lr": PRETRAIN_LR}
    if cache is not None and cache.exists():
        try:
            state = ckpt.load(cache)
            if state.get("key") == key:
                with torch.random.fork_rng(devices=[]):
                    model = baseline_network(config, splits.train.image_shape,
                                             splits.train.num_classes).to(device)
                model.load_state_dict(state["weights"])
                return model
        except (ckpt.CheckpointError, RuntimeError, KeyError, OSError):
            pass
    if not quiet and stream is not None:
        print(f"fastmeta: pretraining the baseline on the {splits.train.num_classes} training "
              f"classes ({config['baseline_steps']} steps)", file=stream, flush=True)
    model = pretrain(config, splits.train, config["baseline_steps"],
                     config["seed"] + BASELINE_SEED_OFFSET, device, quiet, stream)
    if cache is not None:
        try:
            ckpt.save(cache, {"key": key, "weights": model.state_dict()})
        except OSError:
            pass
    return model


def _choose(candidates: dict[Any, tuple], chunks, steps: Sequence[int]) -> tuple[Any, int, float]:
    """The fine-tuning setting (``(lr, ...)`` -> ``(model, head_only)``) and number of
    ``steps`` with the best mean validation accuracy (ties: the earlier setting, fewer steps),
    and that accuracy."""
    best, best_score = None, -1.0
    for setting, (model, head_only) in candidates.items():
        runs = [finetune_scores_at(model, c.support_x, c.support_y, c.query_x, setting[0], steps,
                                   head_only) for c in chunks]
        for n in sorted(steps):
            score = float(torch.cat([task_accuracy(run[n], c.query_y)
                                     for run, c in zip(runs, chunks)]).mean())
            if score > best_score + 1e-12:
                best, best_score = (setting, n), score
    return best[0], best[1], best_score


# Evaluation ---------------------------------------------------------------------------------
def test_tasks(config: dict[str, Any], splits: Splits, num_tasks: int, seed: int, device
               ) -> tuple[list, Tensor]:
    """The test tasks, in chunks of :data:`EVAL_CHUNK`, from their own seed stream, and the
    test-split class ids of the first task (in label order)."""
    sampler = TaskSampler(splits.test, config["ways"], config["shots"], config["eval_queries"],
                          min(EVAL_CHUNK, num_tasks), seed=seed, device=device)
    chunks, left, first = [], num_tasks, None
    while left > 0:
        chunks.append(sampler.sample(min(EVAL_CHUNK, left)))
        if first is None:
            first = sampler.last_classes[0].clone()
        left -= EVAL_CHUNK
    return chunks, first


def evaluate(learner: nn.Module, config: dict[str, Any], splits: Splits, seed: int = TEST_SEED,
             baselines: bool = True, baseline_cache: Path | None = None, quiet: bool = True,
             stream: TextIO | None = None, plot_path: str | os.PathLike | None = None
             ) -> dict[str, Any]:
    """The learner's accuracy on ``config["eval_tasks"]`` new test tasks (mean ± 95% CI),
    beside the scratch and pretrained baselines (``baselines=True``); ``plot_path`` writes
    the figure of the first test task."""
    device = torch.device(config["device"])
    ways, num_tasks = config["ways"], config["eval_tasks"]
    chunks, first_classes = test_tasks(config, splits, num_tasks, seed, device)
    per_task = accuracy_on(learner, chunks, config["eval_steps"])
    mean, ci = mean_ci(per_task)
    results: dict[str, Any] = {
        "ways": ways, "shots": config["shots"], "queries": config["eval_queries"],
        "eval_tasks": num_tasks, "test_seed": seed, "label": config["algorithm"],
        "accuracy": {"meta": {"mean": mean, "ci95": ci}},
    }
    if baselines:
        validation = _validation_tasks(config, splits, device)
        validation = _first_tasks(validation, BASELINE_VAL_TASKS)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config["seed"] + BASELINE_SEED_OFFSET + 1)
            scratch = baseline_network(config, splits.train.image_shape, ways).to(device)
        pretrained = _with_new_head(
            _pretrained_baseline(config, splits, device, baseline_cache, quiet, stream), ways)
        fixed = config.get("finetune_steps")
        grid = FINETUNE_STEP_GRID if fixed is None else (fixed,)
        (scratch_lr,), scratch_steps, scratch_val = _choose(
            {(lr,): (scratch, False) for lr in FINETUNE_LRS}, validation, grid)
        (pre_lr, head_only), pre_steps, pre_val = _choose(
            {(lr, head): (pretrained, head) for lr in FINETUNE_LRS for head in (False, True)},
            validation, grid)
        for name, model, lr, head, steps, val in (
                ("scratch", scratch, scratch_lr, False, scratch_steps, scratch_val),
                ("pretrained", pretrained, pre_lr, head_only, pre_steps, pre_val)):
            accuracy = torch.cat([task_accuracy(finetune_scores(model, c.support_x, c.support_y,
                                                                c.query_x, lr, steps, head),
                                                c.query_y) for c in chunks])
            mean, ci = mean_ci(accuracy)
            # The same test tasks: the paired difference's CI is the comparison's own (much
            # narrower than the two CIs side by side, which share the tasks' difficulty).
            gain, gain_ci = mean_ci(per_task - accuracy)
            results["accuracy"][name] = {"mean": mean, "ci95": ci, "lr": lr, "steps": steps,
                                         "head_only": head, "val_accuracy": val,
                                         "meta_minus_this": {"mean": gain, "ci95": gain_ci}}
        same_budget = (fixed is not None and config["algorithm"] in GRADIENT
                       and fixed == config["eval_steps"])
        results["baseline"] = {
            "finetune": "full-batch Adam on the support set" + (
                "" if fixed is None else f", {fixed} step{'s' if fixed != 1 else ''}"
                + (f" (as many as {config['algorithm']}'s adaptation)" if same_budget else "")),
            "steps_grid": list(grid),
            "lr_grid": list(FINETUNE_LRS),
            "validation_tasks": sum(c.support_x.shape[0] for c in validation),
            "pretrain_steps": config["baseline_steps"], "pretrain_batch": PRETRAIN_BATCH,
            "pretrain_classes": splits.train.num_classes,
        }
    if plot_path is not None:
        first = chunks[0]
        one = slice(0, 1)
        scores = predict(learner, first.support_x[one], first.support_y[one], first.query_x[one],
                         config["eval_steps"])
        names = None
        if splits.test.class_names is not None:
            names = [splits.test.class_names[c] for c in first_classes.tolist()]
        plot_task(first.support_x[0], first.support_y[0], first.query_x[0], first.query_y[0],
                  scores[0].argmax(-1), plot_path, names=names,
                  title=f"{config['dataset']}: a new {ways}-way {config['shots']}-shot test task; "
                        f"{config['algorithm']}'s predictions on its queries",
                  inverted=config["dataset"] != "folder")
    return results


# Reporting ----------------------------------------------------------------------------------
def format_table(results: dict[str, Any]) -> str:
    """The results as a text table: accuracy ± 95% CI for the meta-learner and baselines."""
    label = results.get("algorithm") or results.get("label", "meta-learned")
    dataset = results.get("dataset", "")
    acc = results["accuracy"]
    lines = []
    head = f"{dataset}: {label}"
    if "iterations" in results:
        head += f", {results['iterations']} meta-training iterations"
    lines.append(head)
    lines.append(f"{results['ways']}-way {results['shots']}-shot accuracy ± 95% CI over "
                 f"{results['eval_tasks']} new test tasks ({results['queries']} queries per "
                 f"class), classes never seen in training")
    rows = [(f"{label} (meta-learned)", acc["meta"])]
    if "scratch" in acc:
        rows.append((f"same network from scratch on the support set{_steps(acc['scratch'])}",
                     acc["scratch"]))
    if "pretrained" in acc:
        classes = results.get("baseline", {}).get("pretrain_classes", "all")
        rows.append((f"pretrained on the {classes} training classes + fine-tuned"
                     f"{_steps(acc['pretrained'])}", acc["pretrained"]))
    width = max(len(name) for name, _ in rows) + 2
    paired = all("meta_minus_this" in cell for _, cell in rows[1:]) and len(rows) > 1
    lines.append(f"{'method':<{width}}{'accuracy':<16}"
                 + (f"{label} − this (paired, same tasks)" if paired else "").rstrip())
    for name, cell in rows:
        line = f"{name:<{width}}{format_ci(cell['mean'], cell['ci95']):<16}"
        if paired and "meta_minus_this" in cell:
            gain = cell["meta_minus_this"]
            line += format_ci(gain["mean"], gain["ci95"], signed=True)
        lines.append(line.rstrip())
    if "adaptation" in results:
        lines.append(f"{label} {results['adaptation']}.")
    if "scratch" in acc:
        b = results["baseline"]
        pre = acc["pretrained"]
        lrs = f"step size from {{{', '.join(f'{lr:g}' for lr in b['lr_grid'])}}}"
        steps_chosen = len(b.get("steps_grid", ())) > 1

        def setting(cell):
            return f"{cell['steps']} steps of {cell['lr']:g}" if steps_chosen else f"{cell['lr']:g}"

        lines.append(f"baselines: {b['finetune']}; "
                     + (f"steps from {{{', '.join(map(str, b['steps_grid']))}}} and {lrs}"
                        if steps_chosen else lrs)
                     + f" chosen on {b['validation_tasks']} validation tasks: scratch "
                     f"{setting(acc['scratch'])}, pretrained {setting(pre)} "
                     f"({'head only' if pre['head_only'] else 'all layers'}; pretrained "
                     f"{b['pretrain_steps']} Adam steps).")
    return "\n".join(lines)


def _steps(cell: dict[str, Any]) -> str:
    """A baseline's fine-tuning steps for its table row ("" in results from before they were
    recorded)."""
    steps = cell.get("steps")
    return "" if steps is None else f", {steps} Adam step{'s' if steps != 1 else ''}"


def plot_learning_curves(metrics_path: str | os.PathLike, path: str | os.PathLike,
                         title: str = "meta-training") -> Path | None:
    """Training loss (left) and training and validation accuracy (right) against the
    iteration; None when there are no metrics."""
    records = read_metrics(metrics_path)
    train_records = [r for r in records if r.get("loss") is not None]
    if not train_records:
        return None
    fig, axes = training.figure(1, 2, (11.0, 4.0))
    ax = axes[0][0]
    iterations = [r["iteration"] for r in train_records]
    losses = [r["loss"] for r in train_records]
    span = max(1, round(len(losses) / 20)) | 1
    ax.plot(iterations, losses, color="tab:blue", alpha=0.35 if span > 1 else 1.0, lw=1,
            label="mean per log interval")
    if span > 1:
        ax.plot(iterations, training.smoothed(losses, span), color="tab:blue", lw=2,
                label=f"moving average of {span}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("meta-training loss")
    ax.set_title("training loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax = axes[0][1]
    acc = [r for r in train_records if r.get("accuracy") is not None]
    if acc:
        ax.plot([r["iteration"] for r in acc], [r["accuracy"] for r in acc], color="tab:blue",
                lw=1.5, label="training tasks (query accuracy)")
    val = [r for r in records if r.get("val_accuracy") is not None]
    if val:
        x = [r["iteration"] for r in val]
        y = [r["val_accuracy"] for r in val]
        ci = [r.get("val_ci95") or 0.0 for r in val]
        ax.plot(x, y, color="tab:orange", lw=2, marker="o", ms=3,
                label="validation tasks (held-out classes)")
        ax.fill_between(x, [a - c for a, c in zip(y, ci)], [a + c for a, c in zip(y, ci)],
                        color="tab:orange", alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def _show(ax, image: Tensor, inverted: bool) -> None:
    image = image.detach().float().cpu()
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray_r" if inverted else "gray", vmin=0, vmax=1)
    else:
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def plot_task(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
              predicted: Tensor, path: str | os.PathLike, names: Sequence[str] | None = None,
              title: str = "", inverted: bool = True, queries_shown: int = 4) -> Path:
    """One task: the support images (top row, one column per class, with its label and
    class name), then up to ``queries_shown`` queries of each class below its support
    image, titled with the predicted and true label in green (right) or red (wrong)."""
    ways = int(support_y.max()) + 1
    rows = 1 + queries_shown
    fig, axes = training.figure(rows, ways, (1.6 * ways + 0.4, 1.55 * rows + 0.8))
    correct = int((predicted == query_y).sum())
    for c in range(ways):
        first = int((support_y == c).nonzero()[0, 0])
        ax = axes[0][c]
        _show(ax, support_x[first], inverted)
        shots = int((support_y == c).sum())
        name = names[c] if names else None
        if name is not None and len(name) > 14 and "/" in name:   # Alphabet/characterNN/rot90
            head, tail = name.split("/", 1)
            name = f"{head}/\n{tail}"
        text = f"support: label {c}" + (f"\n{name}" if name else "")
        if shots > 1:
            text += f" (1 of {shots})"
        ax.set_title(text, fontsize=8)
        for side in ax.spines.values():
            side.set_color("tab:blue")
            side.set_linewidth(2)
        mine = (query_y == c).nonzero().flatten()[:queries_shown]
        for r in range(queries_shown):
            ax = axes[1 + r][c]
            if r >= len(mine):
                ax.axis("off")
                continue
            i = int(mine[r])
            _show(ax, query_x[i], inverted)
            ok = int(predicted[i]) == int(query_y[i])
            color = "tab:green" if ok else "tab:red"
            ax.set_title(f"pred {int(predicted[i])} / true {int(query_y[i])}", fontsize=8,
                         color=color)
            for side in ax.spines.values():
                side.set_color(color)
                side.set_linewidth(2.5)
    fig.suptitle(f"{title}\n{correct}/{len(query_y)} queries right "
                 f"(rows 2-{rows}: queries, green right, red wrong)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
