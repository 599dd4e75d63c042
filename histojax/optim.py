"""Optimizer and learning-rate schedule from `config.optimizer`."""

from __future__ import annotations

import jax
import ml_collections
import optax


NAMES = ("adamw", "sgd", "lars")


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr, then cosine decay to lr * end_lr_fraction."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.end_lr_fraction)


def _decay_mask(params):
  # Weight decay on kernels only: biases and norm scales/offsets are 1-D.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int):
  """Returns (optax transformation, learning-rate schedule)."""
  lr = schedule(cfg, total_steps)
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
  return tx, lr
