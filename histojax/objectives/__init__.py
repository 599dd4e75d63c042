"""Training objectives, one module per method, chosen by `config.objective.name`."""

from histojax.objectives import byol, cgd, metric, spq  # noqa: F401  (register their objectives)
from histojax.objectives.base import OBJECTIVES, Objective, build

__all__ = ["OBJECTIVES", "Objective", "build"]
