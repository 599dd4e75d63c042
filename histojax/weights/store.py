"""Imported weights on disk, and `config.init_from` loading them into a train state.

A weights folder (written by `python -m histojax.convert`) holds
  params/        Orbax checkpoint of {"backbone.layer1.0.conv1.kernel": array, ...}
                 (parameters and batch-norm statistics, float32, histojax layout)
  manifest.json  kind, format, source file, the model config the weights were
                 checked against, every variable's shape, the published keys
                 left out and why, the variables left at their fresh init.

Loading fills exactly the saved variables; everything else in the model
(the head, and any `left_at_init` variables) keeps its fresh initialisation.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from histojax import untrusted
from histojax.weights.transfer import IMPORTED_SCOPE, WeightMismatchError, key_of

KIND = "histojax.weights"


def save(directory: epath.PathLike, values: dict[str, np.ndarray], manifest: dict) -> dict:
  """Writes the weights folder; returns the full manifest."""
  directory = epath.Path(directory)
  if (directory / "manifest.json").exists() or (directory / "params").exists():
    raise FileExistsError(f"{directory} already holds weights; choose a new --output folder")
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save((directory / "params").resolve(), values)
  variables = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(values.items())}
  manifest = {"kind": KIND, **manifest, "variables": variables}
  (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
  return manifest


def read_manifest(directory: epath.PathLike) -> dict:
  directory = epath.Path(directory)
  path = directory / "manifest.json"
  if not path.exists():
    raise FileNotFoundError(f"init_from={str(directory)!r} holds no manifest.json: it must be a folder "
                            f"written by `python -m histojax.convert`")
  manifest = untrusted.read_json(path, "weights manifest")
  if manifest.get("kind") != KIND or not isinstance(manifest.get("variables"), dict):
    raise ValueError(f"{path} is not a histojax weights manifest (kind {manifest.get('kind')!r})")
  return manifest


def load(directory: epath.PathLike) -> tuple[dict[str, np.ndarray], dict]:
  """(values by variable key, manifest)."""
  directory = epath.Path(directory)
  manifest = read_manifest(directory)
  target = {k: jax.ShapeDtypeStruct(tuple(v["shape"]), np.dtype(v["dtype"]))
            for k, v in manifest["variables"].items()}
  with ocp.StandardCheckpointer() as ckpt:
    values = ckpt.restore((directory / "params").resolve(), target)
  return {k: np.asarray(v) for k, v in values.items()}, manifest


def check_fits(values: dict, manifest: dict, model_vars: dict, source: str) -> None:
  """Every saved variable exists with its shape; every backbone variable is saved or allowed fresh."""
  unexpected = sorted(k for k in values if k not in model_vars)
  misshaped = sorted(f"{k} saved {tuple(values[k].shape)}, model has {tuple(model_vars[k].shape)}"
                     for k in values if k in model_vars and tuple(values[k].shape) != tuple(model_vars[k].shape))
  fresh = set(manifest.get("left_at_init", ()))
  missing = sorted(k for k in model_vars if k.startswith(IMPORTED_SCOPE) and k not in values and k not in fresh)
  if missing or unexpected or misshaped:
    raise WeightMismatchError(f"init_from {source} (converted for model {manifest['model'].get('name')!r})",
                              missing, unexpected, misshaped)


def apply(model_state: nnx.State, directory: epath.PathLike) -> nnx.State:
  """`model_state` with the saved variables replaced, placed like the ones they replace."""
  values, manifest = load(directory)
  flat = nnx.to_flat_state(model_state)
  model_vars = {key_of(path): var for path, var in flat}
  check_fits(values, manifest, model_vars, str(directory))
  updated = []
  for path, var in flat:
    key = key_of(path)
    if key in values:
      old = var.get_value()
      value = values[key].astype(old.dtype)
      var = var.replace(jax.device_put(value, old.sharding) if hasattr(old, "sharding") else jax.device_put(value))
    updated.append((path, var))
  return nnx.from_flat_state(updated)


def init_train_state(state: nnx.State, directory: epath.PathLike) -> nnx.State:
  """The (model, optimizer) train state with the model part initialised from `directory`.

  Optimizer moments start at zero either way, so only the model changes.
  """
  state[0] = apply(state[0], directory)
  return state
