"""Grain pipelines: a TFDS split -> local numpy batches for this process.

Training batches come from an infinite, resumable order (see samplers.py).
Evaluation batches cover the split exactly once, padded to a whole number of
global batches with `mask=0` rows so every process runs the same number of
steps and nothing is dropped or counted twice.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from histojax import preemption
from histojax.data import augment, decoded, images, samplers


@dataclasses.dataclass(frozen=True)
class _Read(grain.transforms.Map):
  source: object

  def map(self, index):
    record = self.source[int(index)]
    return {"image": images.decode_example(record["image"]), "label": np.int32(record["label"])}


@dataclasses.dataclass(frozen=True)
class _TrainViews(grain.transforms.MapWithIndex):
  """Host geometry: `views` independent crops (+ flips/rot90) of each patch.

  One view is stored as 'image'; two as 'view1' and 'view2' (BYOL, SPQ).
  The generator is seeded by the element's *global* stream position: Grain's
  `random_map` would seed by the process-local index, so a 2-process run
  would crop differently from a 1-process run. It is the generator
  `random_map` builds (Philox(seed), counter on the index), so one process
  reproduces `random_map` exactly.
  """
  cfg: dict
  views: int
  seed: int
  order: grain.MapDataset  # the sampler order, for `position`

  def _view(self, image, rng):
    c = self.cfg
    if c["crop"] == "random_resized":
      image = augment.random_resized_crop(image, c["image_size"], rng, (c["crop_scale_min"], c["crop_scale_max"]),
                                          (c["crop_ratio_min"], c["crop_ratio_max"]))
    else:
      image = augment.random_crop(image, c["image_size"], rng)
    return augment.random_dihedral(image, rng) if c["flip_rot90"] else image

  def map_with_index(self, index: int, example):
    position = self.order.position(index)
    rng = np.random.Generator(np.random.Philox(self.seed, counter=[0, 0, 0, position]))
    if self.views == 1:
      return {"image": self._view(example["image"], rng), "label": example["label"]}
    out = {f"view{v + 1}": self._view(example["image"], rng) for v in range(self.views)}
    return {**out, "label": example["label"]}


def train_dataset(source, labels: np.ndarray, input_config, seed: int, process_index: int = 0,
                  process_count: int = 1, views: int = 1) -> grain.IterDataset:
  """Infinite stream of local batches: {'image': uint8 [B,H,W,3], 'label': int32 [B]},
  or {'view1', 'view2', 'label'} when `views` is 2."""
  cfg = input_config
  process = dict(process_index=process_index, process_count=process_count)
  # Decoded once when it fits (decoded.py says why); same pixels, so the same stream.
  source = decoded.decode_split(source, labels, cfg.get("decoded_cache_gb", 0.0)) or source
  if cfg.sampler == "m_per_class":
    order = samplers.MPerClassOrder(labels, cfg.batch_size, cfg.m_per_class, seed, **process)
  else:
    order = samplers.ShuffledOrder(len(labels), cfg.batch_size, seed, **process)
  ds = (order.map(_Read(source))
        .map_with_index(_TrainViews(cfg.to_dict(), views, seed, order))
        .batch(cfg.batch_size // process_count, drop_remainder=True))
  return _iterate(ds, cfg)


def _iterate(ds: grain.MapDataset, cfg) -> grain.IterDataset:
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, cfg.prefetch), prefetch_buffer_size=cfg.prefetch))
  if cfg.num_workers > 0:
    # Workers ignore SIGTERM so a preemption signal sent to the whole process
    # group leaves the pipeline alive until the main process has saved.
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers),
                        worker_init_fn=preemption.shield_worker)
  return it


@dataclasses.dataclass(frozen=True)
class _EvalRead(grain.transforms.Map):
  source: object
  image_size: int

  def map(self, index):
    index = int(index)
    if index < 0:  # padding row
      return {"image": np.zeros((self.image_size, self.image_size, 3), np.uint8),
              "index": np.int32(-1), "mask": np.float32(0)}
    image = augment.center_crop(images.decode_example(self.source[index]["image"]), self.image_size)
    return {"image": image, "index": np.int32(index), "mask": np.float32(1)}


def eval_positions(num_examples: int, global_batch: int, process_index: int = 0,
                   process_count: int = 1) -> np.ndarray:
  """Example index for each of this process's eval rows; -1 marks padding.

  Global batch b holds examples [b*G, (b+1)*G); process p reads its
  contiguous share of each, so gathering the global batch restores order.
  """
  num_batches = -(-num_examples // global_batch)
  local = global_batch // process_count
  batch = np.arange(num_batches)[:, None] * global_batch
  positions = batch + process_index * local + np.arange(local)[None, :]
  positions = positions.reshape(-1)
  return np.where(positions < num_examples, positions, -1)


def eval_dataset(source, image_size: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1, num_workers: int = 0) -> grain.IterDataset:
  """Finite, ordered local batches {'image', 'index', 'mask'} covering the split once."""
  positions = eval_positions(len(source), global_batch, process_index, process_count)
  ds = (grain.MapDataset.source(positions).map(_EvalRead(source, image_size))
        .batch(global_batch // process_count))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it
