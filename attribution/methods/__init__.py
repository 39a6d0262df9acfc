"""Attribution methods: one interface (query side · train side), many implementations."""

from attribution.methods.airrep import AirRep, AirRepEncoder, group_score
from attribution.methods.base import GradientMethod, Method
from attribution.methods.influence import InfluenceFunction
from attribution.methods.similarity import GradientSimilarity, TracIn
from attribution.methods.trak import TRAK

__all__ = [
    "METHODS",
    "AirRep",
    "AirRepEncoder",
    "GradientMethod",
    "GradientSimilarity",
    "InfluenceFunction",
    "Method",
    "TRAK",
    "TracIn",
    "build_method",
    "group_score",
]

#: method names as the indexer, CLI and API spell them
METHODS = ("trak", "tracin", "graddot", "gradcos", "influence", "airrep")


def build_method(name: str, task, **arguments) -> Method:
    """Construct a method by its registry name with its typed arguments."""
    from attribution.errors import AttributionError

    arguments = {k: v for k, v in arguments.items() if k != "method"}
    if name == "trak":
        return TRAK(task, **arguments)
    if name == "tracin":
        return TracIn(task, **arguments)
    if name in ("graddot", "gradcos"):
        arguments.pop("kind", None)
        return GradientSimilarity(task, kind=name[4:], **arguments)
    if name == "influence":
        return InfluenceFunction(task, **arguments)
    if name == "airrep":
        return AirRep(task, **arguments)
    raise AttributionError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
