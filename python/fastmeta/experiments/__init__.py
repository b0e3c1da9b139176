"""End-to-end experiments behind the ``fastmeta`` command line.

Each experiment is a module with the same interface, looked up by dataset name in
:data:`EXPERIMENTS`:

* ``DEFAULTS``: the default run options (a dict keyed like the command-line options; an
  option it lacks does not apply to the experiment);
* ``ALGORITHMS``: the algorithms it can train;
* ``make_config(options)``: the full run configuration from the options the user gave
  (``None`` meaning "not given": the experiment's default; ``options["dataset"]`` names the
  dataset, for modules that serve several);
* ``train(config, resume=False, quiet=False, evaluate_after=True, explicit=())``:
  meta-trains, checkpoints, evaluates, plots; returns the results dict;
* ``evaluate_checkpoint(state, ...)``: evaluates a loaded checkpoint;
* ``format_table(results)``: the results as a text table.
"""
from __future__ import annotations

import importlib
from types import ModuleType

#: dataset name -> module implementing it (imported on first use)
EXPERIMENTS: dict[str, str] = {
    "digits": "fastmeta.experiments.classification",
    "omniglot": "fastmeta.experiments.classification",
    "folder": "fastmeta.experiments.classification",
    "sinusoid": "fastmeta.experiments.sinusoid",
}

#: ``fastmeta train`` with no dataset: MAML, 5-way 1-shot, on the embedded digits
DEFAULT_DATASET = "digits"


def get(dataset: str) -> ModuleType:
    """The experiment module for ``dataset``."""
    if dataset not in EXPERIMENTS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[dataset])


__all__ = ["EXPERIMENTS", "DEFAULT_DATASET", "get"]
