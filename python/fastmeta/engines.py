"""Which compiled CPU engine serves a model: the MLP engine (fastmeta.engine_cpu) or the
conv4 engine (fastmeta.engine_conv)."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from fastmeta.engine_conv import CompiledConv4
from fastmeta.engine_cpu import CompiledEngine, CompiledMLP


def compiled_engine(model: nn.Module, loss: str,
                    adapted: Sequence[bool] | None = None) -> CompiledEngine:
    """The compiled engine for ``model``. When neither engine can run it, the returned one's
    ``reason`` says why: the conv engine's for a model with convolutions, else the MLP's."""
    mlp = CompiledMLP(model, loss, adapted)
    if mlp.reason is None:
        return mlp
    conv = CompiledConv4(model, loss, adapted)
    if conv.reason is None or any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return conv
    return mlp
