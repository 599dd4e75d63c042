"""Published state dicts -> histojax variables, checked key by key.

A `Format` renames a published key to the module path it has here
("layer1.0.downsample.0.weight" -> "backbone.layer1.0.downsample.conv.weight");
the type of the module found at that path then says what the leaf becomes and
how its layout changes:

  nnx.Conv       weight [O, I, kh, kw] -> kernel [kh, kw, I, O]; bias
  nnx.Linear     weight [O, I] -> kernel [I, O]; bias
  nnx.BatchNorm  weight, bias, running_mean, running_var -> scale, bias, mean, var
  nnx.LayerNorm  weight, bias -> scale, bias

Parameters that are not a standard layer's (class token, position embedding,
fused attention in_proj, CLIP's proj) are a format's `special` rules.
Every variable under the imported scope must be filled, every checkpoint
tensor used or ignored for a stated reason, and every shape must match;
otherwise `WeightMismatchError` lists all the offending keys at once.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import numpy as np
from flax import nnx

from histojax.models import vit

IMPORTED_SCOPE = "backbone."


def conv_kernel(w):
  return np.transpose(w, (2, 3, 1, 0))


def linear_kernel(w):
  return np.transpose(w)


def same(w):
  return w


def leading_ones(w, shape):
  """[D] -> [1, 1, D], [N, D] -> [1, N, D]: CLIP's token parameters in timm's layout."""
  return w if shape is None or w.ndim >= len(shape) else w.reshape((1,) * (len(shape) - w.ndim) + w.shape)


LEAF_RULES = {
    nnx.Conv: {"weight": ("kernel", conv_kernel), "bias": ("bias", same)},
    nnx.Linear: {"weight": ("kernel", linear_kernel), "bias": ("bias", same)},
    nnx.BatchNorm: {"weight": ("scale", same), "bias": ("bias", same), "running_mean": ("mean", same),
                    "running_var": ("var", same)},
    nnx.LayerNorm: {"weight": ("scale", same), "bias": ("bias", same)},
    vit.LayerScale: {"gamma": ("gamma", same)},  # timm's ls1.gamma (transformers' lambda1 renamed to it)
    # torch.nn.MultiheadAttention's fused projection (CLIP): the same q|k|v order as timm's qkv.
    vit.Attention: {"in_proj_weight": ("qkv.kernel", linear_kernel), "in_proj_bias": ("qkv.bias", same)},
}


@dataclasses.dataclass(frozen=True)
class Format:
  """How one family of published checkpoints names and lays out its tensors."""
  name: str
  description: str
  renames: tuple[tuple[str, str], ...]  # regex substitutions, applied in order
  ignore: tuple[tuple[str, str], ...] = ()  # (regex on the published key, reason)
  special: tuple[tuple[str, Callable], ...] = ()  # (regex on the renamed key, fn(value, model_shape))
  scope: Callable[[dict], tuple[dict, dict]] | None = None  # -> (tensors, ignored {key: reason})
  infer: Callable[[dict], dict] | None = None  # architecture fields read off the shapes
  # Hub-folder formats: (preset, config.json, tensors) -> architecture fields; the folder says, the preset completes.
  configure: Callable[..., dict] | None = None

  def select(self, tensors: dict) -> tuple[dict, dict]:
    return self.scope(tensors) if self.scope else (dict(tensors), {})

  def ignored(self, key: str) -> str | None:
    return next((reason for pattern, reason in self.ignore if re.search(pattern, key)), None)

  def rename(self, key: str) -> str:
    for pattern, repl in self.renames:
      key = re.sub(pattern, repl, key)
    return key


class WeightMismatchError(ValueError):
  def __init__(self, source: str, missing: list, unexpected: list, misshaped: list):
    self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
    lines = [f"{source}: {len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped key(s)"]
    for title, keys in (("missing (in the model, not in the checkpoint)", missing),
                        ("unexpected (in the checkpoint, not in the model)", unexpected),
                        ("mis-shaped", misshaped)):
      if keys:
        lines.append(f"{title}:")
        lines += [f"  {k}" for k in keys[:40]]
        if len(keys) > 40:
          lines.append(f"  ... and {len(keys) - 40} more")
    super().__init__("\n".join(lines))


@dataclasses.dataclass
class Imported:
  values: dict[str, np.ndarray]  # "backbone.layer1.0.conv1.kernel" -> array, in the model's dtype
  sources: dict[str, str]  # variable key -> the published key it came from
  ignored: dict[str, str]  # published key -> why it was not imported
  left_at_init: list[str]  # model variables allowed to keep their fresh init


def key_of(path) -> str:
  return ".".join(map(str, path))


def model_variables(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
  """Every variable (parameters and batch statistics) by dotted path."""
  return {key_of(path): jax.ShapeDtypeStruct(var.shape, var.dtype)
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Variable))}


def _module_at(model, path: str):
  node = model
  for part in path.split("."):
    if isinstance(node, nnx.List):
      node = node[int(part)] if part.isdigit() and int(part) < len(node) else None
    else:
      node = getattr(node, part, None)
    if node is None:
      return None
  return node


def _target(model, fmt: Format, name: str, shapes: dict):
  """(variable key, transform) for a renamed published key, or (None, None)."""
  for pattern, fn in fmt.special:
    if re.fullmatch(pattern, name):
      return name, (lambda v, fn=fn: fn(v, shapes[name].shape if name in shapes else None))
  module_path, _, leaf = name.rpartition(".")
  module = _module_at(model, module_path)
  rules = next((r for cls, r in LEAF_RULES.items() if type(module) is cls), None)
  if rules is None or leaf not in rules:
    return None, None
  var, fn = rules[leaf]
  return f"{module_path}.{var}", fn


def import_tensors(model: nnx.Module, tensors: dict[str, np.ndarray], fmt: Format, *, source: str = "checkpoint",
                   allow_missing: tuple[str, ...] = ()) -> Imported:
  """Maps `tensors` onto `model`'s backbone (a real or `nnx.eval_shape` model)."""
  shapes = model_variables(model)
  tensors, ignored = fmt.select(tensors)
  values, sources, unexpected, misshaped, misshaped_targets = {}, {}, [], [], set()
  for key in sorted(tensors):
    reason = fmt.ignored(key)
    if reason:
      ignored[key] = reason
      continue
    name = fmt.rename(key)
    target, fn = _target(model, fmt, name, shapes)
    if target is None or target not in shapes or target in values:
      unexpected.append(key if target is None else f"{key} -> {target}" + (" (twice)" if target in values else ""))
      continue
    value = fn(np.asarray(tensors[key]))
    if tuple(value.shape) != tuple(shapes[target].shape):
      hint = (" (the position grid is model.image_size / model.patch; build the model at the "
              "checkpoint's resolution, inputs of other sizes are resampled at run time)"
              if target.endswith("pos_embed") else "")
      misshaped.append(f"{key} {tuple(tensors[key].shape)} -> {target} needs {tuple(shapes[target].shape)}{hint}")
      misshaped_targets.add(target)
      continue
    values[target] = value.astype(shapes[target].dtype, copy=False)
    sources[target] = key
  allowed = tuple(IMPORTED_SCOPE + p.removeprefix(IMPORTED_SCOPE) for p in allow_missing)
  absent = [k for k in shapes if k.startswith(IMPORTED_SCOPE) and k not in values and k not in misshaped_targets]
  missing = [k for k in absent if not k.startswith(allowed)] if allowed else absent
  if missing or unexpected or misshaped:
    raise WeightMismatchError(f"{source} ({fmt.name} format)", missing, unexpected, misshaped)
  return Imported(values, sources, ignored, sorted(set(absent) - set(missing)))
