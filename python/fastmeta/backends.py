"""Which engine runs a call: the compiled core (``fastmeta._core``) or the torch reference.

``info()`` reports what was built and what is in use. ``auto`` picks the compiled core where
it can serve the algorithm, model and device, and the torch reference engine otherwise;
naming a backend that cannot serve raises a ``ValueError`` that says why.
"""
from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("auto", "cpu", "cuda", "torch")

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Warns once per distinct message, so a training loop does not repeat itself."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _load_core():
    """The compiled module and None, or None and why it is unavailable.

    FASTMETA_DISABLE_CORE=1 hides the core, to run (and test) the pure-torch fallback.
    """
    if os.environ.get("FASTMETA_DISABLE_CORE", "") not in ("", "0"):
        return None, "disabled by FASTMETA_DISABLE_CORE"
    try:
        from fastmeta import _core as module
    except ImportError as error:
        return None, f"{type(error).__name__}: {error}"
    return module, None


_core, _CORE_ERROR = _load_core()
if _core is None:  # everything still works, on the torch reference engine
    warn_once(f"fastmeta's compiled core is unavailable ({_CORE_ERROR}); "
              "using the torch reference engine")


def core():
    """The compiled module; only called once ``resolve`` has chosen the compiled core."""
    if _core is None:
        raise RuntimeError(f"fastmeta's compiled core is unavailable ({_CORE_ERROR})")
    return _core


def info() -> dict:
    """What was built (compiler, OpenMP, CUDA, version) and which engines are usable."""
    report = {"core_available": _core is not None, "torch": torch.__version__}
    if _core is None:
        report["core_error"] = _CORE_ERROR
        report["in_use"] = "torch reference engine"
        return report
    report.update(_core.build_info())
    report["kernels"] = sorted(name for name in dir(_core) if not name.startswith("_")
                               and name != "build_info")
    report["in_use"] = "compiled core (cpu)" + (" and cuda" if report.get("cuda") else "")
    return report


def check_backend_name(backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def context_reason(*tensors: torch.Tensor) -> str | None:
    """Why a call the compiled core could serve must run on the reference engine anyway:
    tensors under a torch.func transform (the core reads raw memory, which they do not have),
    or autocast (the core computes in the parameters' dtype). None when neither applies."""
    for tensor in tensors:
        if torch._C._functorch.is_functorch_wrapped_tensor(tensor):
            return "the call runs under a torch.func transform"
    if torch.is_autocast_enabled("cpu"):
        return "autocast is on (the compiled core computes in the parameters' dtype)"
    return None


def resolve(backend: str, device: torch.device, compiled_reason: str | None) -> str:
    """Returns "cpu" (compiled core) or "torch" for one call.

    ``compiled_reason`` is None when the compiled core supports this algorithm and model,
    otherwise a short reason why not (e.g. the unsupported layer).
    """
    if backend == "torch":
        return "torch"
    if backend == "cuda":
        raise ValueError("backend='cuda': this build of fastmeta has no CUDA kernels yet; "
                         "use backend='torch' for CUDA tensors")
    reason = compiled_reason
    if reason is None and device.type != "cpu":
        reason = f"the compiled core runs on the CPU and the data is on {device}"
    if reason is None and _core is None:
        reason = f"the compiled core is unavailable ({_CORE_ERROR})"
        if backend == "auto":
            return "torch"  # said once, at import
    if reason is None:
        return "cpu"
    if backend == "cpu":
        raise ValueError(f"backend='cpu' cannot serve this call: {reason}")
    warn_once(f"fastmeta: using the torch reference engine because {reason}")
    return "torch"
