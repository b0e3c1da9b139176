"""Task distributions: each yields ready, task-batched tensors."""
from fastmeta.data.sinusoid import Sinusoid

__all__ = ["Sinusoid"]
