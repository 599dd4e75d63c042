"""Models chosen by name: `config.model.name` -> an `Embedder` (see `zoo`)."""

from histojax.models.embedder import Embedder
from histojax.models.zoo import (DTYPES, HEADS, LEGACY_HEAD_FIELDS, MODELS, abstract_model, build_model,
                                 compute_dtype, identity, model_config, parameter_count)

__all__ = ["DTYPES", "Embedder", "HEADS", "LEGACY_HEAD_FIELDS", "MODELS", "abstract_model", "build_model",
           "compute_dtype", "identity", "model_config", "parameter_count"]
