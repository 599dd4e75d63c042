"""Training objectives, one module per method, chosen by `config.objective.name`."""

from histojax.objectives import metric  # noqa: F401  (registers its objectives)
from histojax.objectives.base import OBJECTIVES, Objective, build

__all__ = ["OBJECTIVES", "Objective", "build"]
