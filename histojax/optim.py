"""Optimizer and learning-rate schedule from `config.optimizer`; what fine-tuning freezes
and how fast each depth learns from `config.finetune`.

Fine-tuning a pretrained trunk (a foundation model imported with `convert`) follows the
field's recipes: `trunk="frozen"` trains the head alone (linear probing of a retrieval
embedding); `trunk="last_blocks"` also trains the last `unfrozen_blocks` transformer
blocks (ResNet stages); `layer_decay` < 1 is layer-wise learning-rate decay (BEiT, DINOv2
fine-tuning): block i of L learns at lr * layer_decay ** (L + 1 - i), the patch embedding
and tokens (depth 0) slowest, the final norm and the head at lr. Frozen parameters get no
optimizer state (no Adam moments for a frozen 1.1B-parameter trunk) and, their gradients
unused, XLA drops their computation. Batch-norm statistics of a frozen ResNet trunk still
follow the batches in training mode; ViTs have none.
"""

from __future__ import annotations

import re

import jax
import ml_collections
import optax

NAMES = ("adamw", "sgd", "lars")
TRUNKS = ("train", "frozen", "last_blocks")
# A parameter's depth in the trunk: timm/CLIP ViT blocks (`blocks.N`, N from 0) or ResNet
# stages (`layerN`, N from 1); what comes before them is depth 0, after them depth L + 1.
_BLOCK = re.compile(r"(?:^|\.)(?:blocks\.(\d+)|layer(\d+))(?:\.|$)")
_TRUNK = "backbone"


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr, then cosine decay to lr * end_lr_fraction."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.end_lr_fraction)


def _decay_mask(params):
  # Weight decay on kernels only: biases and norm scales/offsets are 1-D.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int, finetune=None):
  """Returns (optax transformation, learning-rate schedule); `finetune` is
  `config.finetune` (None or its defaults: every parameter trained at lr)."""
  lr = schedule(cfg, total_steps)
  tx = _base_optimizer(cfg, lr)
  if finetune is not None and (finetune.trunk != "train" or finetune.layer_decay != 1.0):
    tx = optax.multi_transform({"trained": optax.chain(tx, scale_by_depth(finetune.layer_decay)),
                                "frozen": optax.set_to_zero()},
                               lambda params: frozen_labels(params, finetune))
  return tx, lr


def _base_optimizer(cfg: ml_collections.ConfigDict, lr):
  if cfg.name == "adamw":
    tx = optax.adamw(lr, weight_decay=cfg.weight_decay, mask=_decay_mask)
  elif cfg.name == "lars":
    # LARS (You et al., 2017) as BYOL trains: biases and norm parameters get
    # neither weight decay nor the layer-wise trust ratio.
    tx = optax.lars(lr, weight_decay=cfg.weight_decay, weight_decay_mask=_decay_mask,
                    trust_coefficient=0.001, trust_ratio_mask=_decay_mask, momentum=cfg.momentum)
  elif cfg.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask),
                     optax.sgd(lr, momentum=cfg.momentum, nesterov=True))
  else:
    raise ValueError(f"optimizer.name must be one of {NAMES}, got {cfg.name!r}")
  if cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx


# --- Fine-tuning ------------------------------------------------------------------------

def path_name(path) -> str:
  """'backbone.blocks.3.mlp.fc1.kernel' from a pytree key path (NNX's `.value` dropped)."""
  keys = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
  return ".".join(str(k) for k in keys if k != "value")


def _trunk_block(name: str) -> int | None:
  """The block a trunk parameter belongs to, counted from 1; 0 before the blocks; None
  after them (final norm) or outside the trunk."""
  parts = name.split(".")
  if _TRUNK not in parts:
    return None
  found = _BLOCK.search(name)
  if found:
    return int(found.group(1)) + 1 if found.group(1) is not None else int(found.group(2))
  after = {"norm", "fc_norm", "proj", "norm_post"} & set(parts[parts.index(_TRUNK) + 1:][:1])
  return None if after else 0


def trunk_depth(names) -> int:
  """L: the number of blocks (ViT) or stages (ResNet) among `names`."""
  return max([b for b in map(_trunk_block, names) if b is not None] or [0])


def depth_of(name: str, depth: int) -> int:
  """0 (patch embedding, tokens, stem) .. depth (last block) .. depth + 1 (final norm, head,
  anything outside the trunk)."""
  block = _trunk_block(name)
  return depth + 1 if block is None else block


def frozen_labels(params, finetune) -> object:
  """'frozen' or 'trained' per parameter, from `finetune.trunk` (module doc)."""
  names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  depth = trunk_depth(names)
  if finetune.trunk == "last_blocks" and finetune.unfrozen_blocks > depth:
    raise ValueError(f"finetune.unfrozen_blocks={finetune.unfrozen_blocks}, but the trunk has {depth} blocks")
  first_trained = {"train": 0, "frozen": depth + 2, "last_blocks": depth + 1 - finetune.unfrozen_blocks}
  cut = first_trained[finetune.trunk]

  def label(path, _):
    name = path_name(path)
    in_trunk = _TRUNK in name.split(".")
    return "frozen" if in_trunk and depth_of(name, depth) < cut else "trained"
  return jax.tree_util.tree_map_with_path(label, params)


def scale_by_depth(decay: float) -> optax.GradientTransformation:
  """Scales each update by decay ** (L + 1 - depth): layer-wise learning-rate decay, applied
  after the optimizer so that AdamW's decoupled weight decay scales with the lr too."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(updates)]
    depth = trunk_depth(names)
    scaled = jax.tree_util.tree_map_with_path(
        lambda p, u: u * decay ** (depth + 1 - depth_of(path_name(p), depth)), updates)
    return scaled, state
  return optax.GradientTransformation(init, update)
