"""Training orders: which example fills each slot of each global batch.

An order is a pure function of (seed, epoch, position), so any process can
compute its slots without talking to the others, and restarting at position
p replays the exact stream. Each order is an infinite `grain.MapDataset` of
example indices; process `p` of `P` sees, for every global batch of `G` rows,
the contiguous rows `[p*G/P, (p+1)*G/P)`.
"""

from __future__ import annotations

import sys

import grain
import numpy as np


class _EpochOrder(grain.MapDataset):
  """Infinite order built epoch by epoch; subclasses define one epoch."""

  def __init__(self, num_examples: int, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    super().__init__()
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} does not divide over {process_count} processes")
    self._batches_per_epoch = num_examples // global_batch
    if self._batches_per_epoch == 0:
      raise ValueError(f"global batch {global_batch} is larger than the split ({num_examples} examples)")
    self._global_batch = global_batch
    self._local_batch = global_batch // process_count
    self._process_index = process_index
    self._seed = seed
    self._cached: tuple[int, np.ndarray] | None = None

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, offset = divmod(self.position(index), self._batches_per_epoch * self._global_batch)
    return int(self._order(epoch)[offset])

  def position(self, index: int) -> int:
    """Global stream position of this process's `index`-th element.

    Per-element randomness (augmentation) is keyed on this, not on `index`,
    so the same example gets the same crop whatever the process count.
    """
    batch, row = divmod(index, self._local_batch)
    return batch * self._global_batch + self._process_index * self._local_batch + row

  def _order(self, epoch: int) -> np.ndarray:
    if self._cached is None or self._cached[0] != epoch:
      rng = np.random.default_rng([self._seed, epoch])
      self._cached = (epoch, self._epoch(rng))
    return self._cached[1]

  def _epoch(self, rng: np.random.Generator) -> np.ndarray:
    raise NotImplementedError


class ShuffledOrder(_EpochOrder):
  """Each epoch a fresh permutation; the remainder that fills no batch is dropped."""

  def __init__(self, num_examples: int, global_batch: int, seed: int, **process):
    super().__init__(num_examples, global_batch, seed, **process)
    self._n = num_examples

  def _epoch(self, rng):
    return rng.permutation(self._n)[: self._batches_per_epoch * self._global_batch]


class MPerClassOrder(_EpochOrder):
  """Class-balanced batches for metric learning: G/m classes, m examples each.

  Every global batch draws G/m distinct classes at random, and m examples of
  each from that class's own shuffled cycle, so within an epoch each class's
  examples are used before any repeats. A class with fewer than m examples is
  drawn with repetition. An epoch has as many batches as the split has rows.
  """

  def __init__(self, labels: np.ndarray, global_batch: int, m: int, seed: int, **process):
    super().__init__(len(labels), global_batch, seed, **process)
    if global_batch % m:
      raise ValueError(f"batch size {global_batch} is not a multiple of m_per_class={m}")
    self._classes_per_batch = global_batch // m
    self._m = m
    self._members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    if self._classes_per_batch > len(self._members):
      raise ValueError(
          f"batch size {global_batch} with m_per_class={m} needs {self._classes_per_batch} classes per "
          f"batch, but the split has only {len(self._members)}")

  def _epoch(self, rng):
    cycles = [_Cycle(members, rng) for members in self._members]
    order = []
    for _ in range(self._batches_per_epoch):
      for c in rng.choice(len(cycles), self._classes_per_batch, replace=False):
        order.append(cycles[c].take(self._m))
    return np.concatenate(order)


class _Cycle:
  """Draws from a shuffled list, reshuffling each time it runs out."""

  def __init__(self, members: np.ndarray, rng: np.random.Generator):
    self._members, self._rng = members, rng
    self._queue = rng.permutation(members)

  def take(self, m: int) -> np.ndarray:
    out = []
    while m > 0:
      if len(self._queue) == 0:
        self._queue = self._rng.permutation(self._members)
      out.append(self._queue[:m])
      m -= len(out[-1])
      self._queue = self._queue[len(out[-1]):]
    return np.concatenate(out)
