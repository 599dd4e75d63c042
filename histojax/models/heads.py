"""Heads: backbone features -> retrieval embedding (+ what objectives need).

Every head has `__call__(features) -> embedding` ([N, D], float32, unit rows)
and `outputs(features) -> dict` holding at least `embedding` and `features`
(the pooled backbone features) plus its own extras:

  EmbeddingHead  linear projection (or none) + L2
  CGDHead        `descriptors` [N, D/k] per global descriptor, `aux_logits`
  BYOLHead       `projection`, `prediction`, `probe_logits`
  EnsembleHead   `learners` [N, M, D/M], each unit-norm (ABE-M)

Backbones hand over what they naturally make: CNNs a feature map [N, H, W, C],
ViTs a pooled vector [N, C]. Pooling is the head's business because CGD
pools one feature map several ways.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)  # norms in fp32 even when the trunk runs in bf16
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def global_pool(features):
  """Average over space for a feature map; pooled vectors pass through."""
  if features.ndim == 4:
    return jnp.mean(features, axis=(1, 2))
  if features.ndim == 2:
    return features
  raise ValueError(f"expected features [N, H, W, C] or [N, C], got shape {features.shape}")


def linear(din, dout, *, bias=True, dtype, rngs):
  return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class EmbeddingHead(nnx.Module):
  """Linear projection to `dim`, then L2 (cosine geometry). dim 0: L2 of the features."""

  def __init__(self, in_features: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.proj = linear(in_features, dim, dtype=dtype, rngs=rngs) if dim else None

  def outputs(self, features) -> dict:
    pooled = global_pool(features)
    return {"embedding": l2_normalize(pooled if self.proj is None else self.proj(pooled)),
            "features": pooled}

  def __call__(self, features):
    return self.outputs(features)["embedding"]


# --- CGD: combination of global descriptors (Jun et al. 2019) --------------

DESCRIPTORS = {"S": "SPoC (mean)", "M": "MAC (max)", "G": "GeM (generalised mean)"}
DESCRIPTOR_NORMS = ("none", "batch_norm")


def parse_descriptors(descriptors: str) -> str:
  if not descriptors or any(d not in DESCRIPTORS for d in descriptors) or len(set(descriptors)) != len(descriptors):
    raise ValueError(f"model.head.descriptors must be distinct letters from {''.join(DESCRIPTORS)} "
                     f"({', '.join(f'{k}: {v}' for k, v in DESCRIPTORS.items())}), got {descriptors!r}")
  return descriptors


def gem(fmap, p, eps: float = 1e-6):
  """Generalised mean over space: (mean x^p)^(1/p); p=1 is SPoC, p->inf is MAC."""
  x = jnp.maximum(fmap.astype(jnp.float32), eps)
  return jnp.mean(x ** p, axis=(1, 2)) ** (1.0 / p)


class CGDHead(nnx.Module):
  """Global descriptors of one feature map, each FC -> L2, concatenated -> L2.

  `descriptors` is an ordered string such as "SMG" or "GS"; the first one
  also feeds the auxiliary classifier (batch norm -> FC to `num_classes`;
  0 disables it), trained with cross-entropy by the objective. `dim` is the
  total embedding width, split evenly over the descriptors. GeM's p is a
  learned scalar when `gem_learnable`, else the constant `gem_p`.

  `descriptor_norm="batch_norm"` standardises each pooled descriptor by batch
  statistics (running ones in eval mode; no learned shift or scale) before
  its FC. Why: pooled ReLU features are non-negative, so they share one large
  mean direction (measured on BACH at init: the norm of the mean unit
  descriptor is 0.998, and the mean's image under the bias-free FC is 6x the
  spread around it). Without centring every embedding starts in one narrow
  cone, the batch-hard triplet term sits at its margin, and the exported
  gallery stays collapsed (norm of its mean 0.9997, every neighbour score
  0.9998-1.0: histojax.health). "none" is the original CGD head.
  """

  def __init__(self, in_features: int, dim: int, *, descriptors: str = "SMG", gem_p: float = 3.0,
               gem_learnable: bool = False, num_classes: int = 0, descriptor_norm: str = "none",
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.descriptors = parse_descriptors(descriptors)
    if descriptor_norm not in DESCRIPTOR_NORMS:
      raise ValueError(f"model.head.descriptor_norm must be one of {DESCRIPTOR_NORMS}, got {descriptor_norm!r}")
    if dim <= 0 or dim % len(descriptors):
      raise ValueError(f"model.embed_dim ({dim}) must be a positive multiple of the number of "
                       f"descriptors in model.head.descriptors={descriptors!r}")
    if gem_p <= 0:
      raise ValueError(f"model.head.gem_p must be positive, got {gem_p}")
    self.gem_p = nnx.Param(jnp.asarray(gem_p, jnp.float32)) if gem_learnable else float(gem_p)
    self.fcs = nnx.List([linear(in_features, dim // len(descriptors), bias=False, dtype=dtype, rngs=rngs)
                         for _ in descriptors])
    # Statistics only, in fp32: a learned shift would let the FC's output drift off-centre again.
    self.norms = nnx.List([nnx.BatchNorm(in_features, use_bias=False, use_scale=False, momentum=0.9, epsilon=1e-5,
                                         dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
                           for _ in descriptors]) if descriptor_norm == "batch_norm" else None
    self.aux_bn = nnx.BatchNorm(in_features, momentum=0.9, epsilon=1e-5, dtype=dtype,
                                param_dtype=jnp.float32, rngs=rngs) if num_classes else None
    self.aux_fc = linear(in_features, num_classes, dtype=dtype, rngs=rngs) if num_classes else None

  def pool(self, kind: str, fmap):
    if kind == "S":
      return jnp.mean(fmap.astype(jnp.float32), axis=(1, 2))
    if kind == "M":
      return jnp.max(fmap.astype(jnp.float32), axis=(1, 2))
    p = self.gem_p[...] if isinstance(self.gem_p, nnx.Param) else self.gem_p
    return gem(fmap, p)

  def outputs(self, fmap) -> dict:
    if fmap.ndim != 4:
      raise ValueError(f"the cgd head pools a convolutional feature map [N, H, W, C]; this backbone "
                       f"yields shape {fmap.shape} (use a ResNet-family model)")
    out = {"features": jnp.mean(fmap, axis=(1, 2))}
    parts = []
    for i, (kind, fc) in enumerate(zip(self.descriptors, self.fcs)):
      g = self.pool(kind, fmap)
      if i == 0 and self.aux_fc is not None:
        out["aux_logits"] = self.aux_fc(self.aux_bn(g.astype(fmap.dtype))).astype(jnp.float32)
      if self.norms is not None:
        g = self.norms[i](g)
      parts.append(l2_normalize(fc(g.astype(fmap.dtype))))
    out["descriptors"] = tuple(parts)
    out["embedding"] = l2_normalize(jnp.concatenate(parts, axis=-1))
    return out

  def __call__(self, fmap):
    return self.outputs(fmap)["embedding"]


# --- BYOL: projector and predictor ------------------------------------------

class MLP(nnx.Module):
  """Linear -> batch norm -> ReLU -> Linear: BYOL's projector and predictor."""

  def __init__(self, in_features: int, hidden: int, out: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = linear(in_features, hidden, dtype=dtype, rngs=rngs)
    self.bn = nnx.BatchNorm(hidden, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.fc2 = linear(hidden, out, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.bn(self.fc1(x)))).astype(jnp.float32)


class BYOLHead(nnx.Module):
  """Retrieval embedding = L2(pooled features); projector/predictor for the BYOL loss.

  The target network needs only `project` (no predictor); the online
  network uses `outputs`. `probe_classes` > 0 adds a linear probe on
  stop-gradient features, so label accuracy can be monitored for free.
  """

  def __init__(self, in_features: int, *, projector_hidden: int = 4096, projector_dim: int = 256,
               predictor_hidden: int = 4096, probe_classes: int = 0, dtype=jnp.float32, rngs: nnx.Rngs):
    self.projector = MLP(in_features, projector_hidden, projector_dim, dtype=dtype, rngs=rngs)
    self.predictor = MLP(projector_dim, predictor_hidden, projector_dim, dtype=dtype, rngs=rngs)
    self.probe = linear(in_features, probe_classes, dtype=dtype, rngs=rngs) if probe_classes else None

  def project(self, features):
    return self.projector(global_pool(features))

  def outputs(self, features) -> dict:
    pooled = global_pool(features)
    projection = self.projector(pooled)
    out = {"embedding": l2_normalize(pooled), "features": pooled, "projection": projection,
           "prediction": self.predictor(projection)}
    if self.probe is not None:
      out["probe_logits"] = self.probe(jax.lax.stop_gradient(pooled)).astype(jnp.float32)
    return out

  def __call__(self, features):
    return l2_normalize(global_pool(features))


# --- ABE-M: one embedding per learner ---------------------------------------

class EnsembleHead(nnx.Module):
  """[N, M, F] per-learner features -> M unit sub-embeddings of dim/M; the
  embedding is their concatenation divided by sqrt(M), hence unit-norm."""

  def __init__(self, in_features: int, dim: int, num_learners: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    if dim <= 0 or dim % num_learners:
      raise ValueError(f"model.embed_dim ({dim}) must be a positive multiple of model.num_learners ({num_learners})")
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                             batch_axis=(0,))
    self.kernel = nnx.Param(init(rngs.params(), (num_learners, in_features, dim // num_learners)))
    self.bias = nnx.Param(jnp.zeros((num_learners, dim // num_learners), jnp.float32))
    self.dtype = dtype

  def outputs(self, features) -> dict:
    if features.ndim != 3:
      raise ValueError(f"the ensemble head expects per-learner features [N, M, F], got {features.shape}")
    sub = jnp.einsum("nmf,mfd->nmd", features.astype(self.dtype), self.kernel[...].astype(self.dtype))
    learners = l2_normalize(sub + self.bias[...].astype(sub.dtype))
    n, m, _ = learners.shape
    return {"embedding": learners.reshape(n, -1) / math.sqrt(m), "learners": learners,
            "features": features}

  def __call__(self, features):
    return self.outputs(features)["embedding"]
