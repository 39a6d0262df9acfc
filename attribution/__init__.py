"""tdaserve's attribution engine: which training examples made a model produce a prediction.

Every method scores a (test, train) pair as an inner product ⟨query(test), train(i)⟩.
"""

from attribution.applications import group_effect, self_influence, value
from attribution.checkpoints import Checkpoint
from attribution.data import Examples
from attribution.errors import AttributionError
from attribution.methods import (
    METHODS,
    TRAK,
    AirRep,
    GradientSimilarity,
    InfluenceFunction,
    Method,
    TracIn,
    build_method,
)
from attribution.tasks import CausalLMTask, ClassificationTask, RegressionTask, Task
from attribution.version import FEATURIZER_VERSION

__all__ = [
    "AirRep",
    "AttributionError",
    "CausalLMTask",
    "Checkpoint",
    "ClassificationTask",
    "Examples",
    "FEATURIZER_VERSION",
    "GradientSimilarity",
    "InfluenceFunction",
    "METHODS",
    "Method",
    "RegressionTask",
    "TRAK",
    "Task",
    "TracIn",
    "build_method",
    "group_effect",
    "self_influence",
    "value",
]
