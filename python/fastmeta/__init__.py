"""fastmeta: fast, exact gradient-based meta-learning under a thin PyTorch API."""
from fastmeta import backends, data, models
from fastmeta.maml import ANIL, MAML, MetaSGD
from fastmeta.reference import AdaptedModel
from fastmeta.reptile import Reptile
from fastmeta import metric
from fastmeta.metric import ProtoNet, RelationNet

__version__ = "0.1.0"
__all__ = ["MAML", "MetaSGD", "ANIL", "Reptile", "AdaptedModel", "backends", "data", "models"]
__all__ += ["ProtoNet", "RelationNet", "metric"]
