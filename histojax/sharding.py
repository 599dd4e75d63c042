"""Where each array of the train state lives on the mesh: rules by path.

The mesh has two axes, `data` and `fsdp`; batches are split over both. With
`mesh.fsdp = 1` every state array is replicated (plain data parallelism).
With `mesh.fsdp = F > 1` the parameters and optimizer moments are split F
ways (FSDP / ZeRO-3): each device keeps 1/F of the weights and of Adam's
moments, the step all-gathers the weights just before it uses them, and the
gradients are reduced back to shards. The math is unchanged; only memory and
communication move.

Which arrays are split is decided by `mesh.rules`: (regex, strategy) pairs
matched with `re.search` against the array's path in the state, first match
wins. Paths look like

    0/backbone/layer1/0/conv1/kernel            a parameter (or batch statistic)
    1/opt_state/0/mu/backbone/layer1/0/conv1/kernel   its Adam moment

so a rule on a parameter's name (`conv1/kernel$`) also places its moments.
Strategies: "fsdp" splits the largest dimension that divides by the fsdp
axis size (arrays below `mesh.fsdp_min_size` elements, or with no such
dimension, stay replicated: gathering them would cost more than it saves);
"replicate" keeps the array whole on every device.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

STRATEGIES = ("fsdp", "replicate")


def path_str(path) -> str:
  """`0/backbone/conv1/kernel` from a tree path (nnx's trailing `.value` dropped)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
      parts.append(key.name)
  return "/".join(parts)


def compile_rules(mesh_config: ml_collections.ConfigDict) -> list[tuple[re.Pattern, str]]:
  """Validated `mesh.rules`; errors name the offending entry."""
  compiled = []
  for i, rule in enumerate(mesh_config.rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise ValueError(f"mesh.rules[{i}] must be a (regex, strategy) pair, got {rule!r}")
    pattern, strategy = rule
    if strategy not in STRATEGIES:
      raise ValueError(f"mesh.rules[{i}] strategy must be one of {STRATEGIES}, got {strategy!r}")
    try:
      compiled.append((re.compile(pattern), strategy))
    except re.error as e:
      raise ValueError(f"mesh.rules[{i}] regex {pattern!r} does not compile: {e}") from None
  return compiled


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """Splits the largest dimension divisible by `fsdp` over the `fsdp` axis."""
  size = 1
  for d in shape:
    size *= d
  if fsdp == 1 or size < max(min_size, 1):
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp == 0]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda i: (shape[i], i))  # ties: the later (output) dim
  return P(*([None] * dim + ["fsdp"]))


def state_shardings(state: Any, mesh: Mesh, mesh_config: ml_collections.ConfigDict) -> Any:
  """A NamedSharding for every leaf of `state` (arrays or ShapeDtypeStructs)."""
  rules = compile_rules(mesh_config)
  fsdp = mesh.shape["fsdp"]

  def place(path, leaf):
    name = path_str(path)
    strategy = next((s for pattern, s in rules if pattern.search(name)), "replicate")
    if strategy == "fsdp":
      return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp, mesh_config.fsdp_min_size))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(place, state)


def compute_shardings(shardings: Any) -> Any:
  """The same tree, every array whole on each device: the layout a step computes in."""
  return jax.tree.map(lambda s: NamedSharding(s.mesh, P()), shardings)


def describe(state: Any) -> str:
  """One line: how much of the state is split, and what a device holds."""
  total = per_device = split = count = 0
  for leaf in jax.tree.leaves(state):
    nbytes = leaf.size * leaf.dtype.itemsize
    shard = leaf.sharding.shard_shape(leaf.shape)
    shard_bytes = leaf.dtype.itemsize
    for d in shard:
      shard_bytes *= d
    total += nbytes
    per_device += shard_bytes
    split += shard_bytes < nbytes
    count += 1
  mib = 2**20
  return (f"state: {count} arrays, {split} split over fsdp; {total / mib:.1f} MiB in all, "
          f"{per_device / mib:.1f} MiB per device")
