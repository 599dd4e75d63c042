"""Fine-tuning a pretrained trunk (config.finetune): frozen trunk, last blocks, layer-wise
learning-rate decay, and FSDP over a wide ViT at reduced depth."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from histojax import config as config_lib
from histojax import mesh as mesh_lib
from histojax import optim
from histojax import step as step_lib
from histojax.models import zoo

VIT_NAMES = ["backbone.patch_embed.kernel", "backbone.cls_token", "backbone.pos_embed",
             "backbone.blocks.0.attn.qkv.kernel", "backbone.blocks.3.mlp.fc2.bias", "backbone.norm.scale",
             "head.proj.kernel"]
RESNET_NAMES = ["backbone.conv1.kernel", "backbone.bn1.scale", "backbone.layer1.0.conv1.kernel",
                "backbone.layer4.1.bn2.bias", "head.proj.kernel"]


def test_depth_of_each_parameter():
  assert optim.trunk_depth(VIT_NAMES) == 4
  assert [optim.depth_of(n, 4) for n in VIT_NAMES] == [0, 0, 0, 1, 4, 5, 5]
  assert optim.trunk_depth(RESNET_NAMES) == 4
  assert [optim.depth_of(n, 4) for n in RESNET_NAMES] == [0, 0, 1, 4, 5]
  # BYOL keeps its trunk under online/target: the trunk is found by name, not position.
  assert optim.depth_of("online.backbone.blocks.1.norm1.scale", 4) == 2


def _vit_config(trunk="train", unfrozen=0, decay=1.0, width=32, layers=4, heads=2):
  config = config_lib.base_config(model="vit_b16")
  config.model.update(width=width, layers=layers, heads=heads, mlp_dim=2 * width, image_size=32, patch=16,
                      embed_dim=8)
  config.input.update(batch_size=16, m_per_class=4, image_size=32)
  config.optimizer.update(name="adamw", lr=1e-2, warmup_steps=0, weight_decay=0.0)
  config.finetune.update(trunk=trunk, unfrozen_blocks=unfrozen, layer_decay=decay)
  config.total_steps = 10
  config_lib.validate(config)
  return config


def _one_step(config, devices):
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  trainer, state = step_lib.create(config, mesh)
  before = {optim.path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state[0])}
  rng = np.random.default_rng(0)
  b, s = config.input.batch_size, config.input.image_size
  batch = {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
           "label": np.repeat(np.arange(b // config.input.m_per_class), config.input.m_per_class).astype(np.int32)}
  state, _ = step_lib.jit_train_step(trainer, state)(state, mesh_lib.to_global(batch, mesh), jax.random.key(0))
  after = {optim.path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state[0])}
  return before, after, state


def _names(tree) -> list[str]:
  return [optim.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _moved(before, after) -> dict[str, float]:
  """Largest absolute change of every parameter (kernels, biases, tokens)."""
  return {k: float(np.abs(after[k] - before[k]).max()) for k in before if before[k].dtype.kind == "f"}


@pytest.mark.parametrize("trunk,unfrozen", [("frozen", 0), ("last_blocks", 2)])
def test_frozen_parts_do_not_move_and_get_no_optimizer_state(devices, trunk, unfrozen):
  before, after, state = _one_step(_vit_config(trunk, unfrozen), devices)
  moved = _moved(before, after)
  for name, change in moved.items():
    block = optim.depth_of(name, 4)
    trained = name.startswith("head") or (trunk == "last_blocks" and block > 4 - unfrozen)
    # Adam's first step moves every trained value by about lr (1e-2) whatever its gradient.
    assert (change > 1e-3) == trained, (name, change)
  # Adam's first moments exist for the trained parameters only.
  with_moments = {name.split(".mu.", 1)[1] for name in _names(state[1]) if ".mu." in name}
  assert with_moments == {name for name, change in moved.items() if change > 1e-3}


def test_layer_decay_scales_each_depth(devices):
  """Adam's first update is lr * g / (|g| + eps) ~ lr per value: each depth moves by
  lr * decay ** (L + 1 - depth), exactly the schedule, not merely in order."""
  decay = 0.5
  before, after, _ = _one_step(_vit_config(decay=decay), devices)
  moved = _moved(before, after)
  for name, change in moved.items():
    expected = 1e-2 * decay ** (5 - optim.depth_of(name, 4))
    assert expected * 0.9 < change <= expected * 1.0001, (name, change, expected)


def test_unknown_finetune_settings_name_the_field():
  with pytest.raises(ValueError, match="finetune.trunk"):
    _vit_config(trunk="half")
  with pytest.raises(ValueError, match="finetune.unfrozen_blocks"):
    _vit_config(trunk="last_blocks", unfrozen=0)
  with pytest.raises(ValueError, match="finetune.layer_decay"):
    _vit_config(decay=1.5)
  with pytest.raises(ValueError, match="unfrozen_blocks=9, but the trunk has 4 blocks"):
    _one_step(_vit_config(trunk="last_blocks", unfrozen=9), jax.devices()[:1])


def test_fsdp_splits_a_wide_vit_and_trains_its_last_block(devices):
  """ViT-g width (1536, 24 heads of 64, SwiGLU-sized MLP) at 2 blocks, split over 8 devices:
  every large parameter is sharded, the frozen first block gets no moments, and a step runs."""
  config = _vit_config("last_blocks", 1, 0.9, width=1536, layers=2, heads=24)
  config.model.mlp_dim = 4096
  config.mesh.update(data=1, fsdp=8)
  before, after, state = _one_step(config, devices)
  large = {optim.path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(state[0])
           if v.size >= config.mesh.fsdp_min_size}
  assert len(large) == 9 and all(not v.sharding.is_fully_replicated for v in large.values())  # 4 kernels x 2 + patches
  moved = _moved(before, after)
  assert moved["backbone.blocks.0.mlp.fc1.kernel"] == 0 and moved["backbone.blocks.1.mlp.fc1.kernel"] > 1e-3
  assert not any(".mu.backbone.blocks.0." in n for n in _names(state[1]))
  assert zoo.parameter_count(zoo.abstract_model(config.model).backbone) > 45_000_000
