"""Task distributions: each yields ready, task-batched tensors."""
from fastmeta.data.sinusoid import Sinusoid
from fastmeta.data.images import ClassDataset, DataError, split_classes
from fastmeta.data.digits import Digits
from fastmeta.data.omniglot import Omniglot
from fastmeta.data.folder import ImageFolderTasks
from fastmeta.data.sampler import FewShotTasks, TaskSampler

__all__ = ["Sinusoid"]
__all__ += ["ClassDataset", "DataError", "split_classes", "Digits", "Omniglot",
            "ImageFolderTasks", "FewShotTasks", "TaskSampler"]
