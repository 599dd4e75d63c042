"""Training tiles decoded once into a memory-mapped array, so each step reads pixels, not PNGs.

Decoding a 256 px PNG tile costs ~1.5 ms of a core; cropping and flipping it
costs ~0.2 ms. On a GPU host the ResNet-50 step consumes ~6,000 images/s, and
16 cores decoding every tile on every epoch delivered 4,181 (bench/results/
input_pipeline_h200.json): the pipeline, not the chip, set the pace. A split
that fits in `input.decoded_cache_gb` is therefore decoded once, by threads,
into a uint8 [N, H, W, 3] `.npy` file in a private temporary folder; the
pipeline's readers (the main process and every Grain worker, which receive a
pickled copy naming the file) map it read-only and share the page cache.
Pixels are byte-identical to decoding on the fly (tests/test_decoded.py), so
training streams do not change.

The folder belongs to the process that built it and is removed when that
object is collected or the process exits; copies in workers never remove it.
A split whose tiles differ in shape, that would not fit the budget, or that
the temporary folder has no room for, is read encoded as before.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import tempfile
import weakref

import numpy as np

from histojax.data import images as images_lib


class DecodedSplit:
  """Random-access source of {'image': uint8 [H, W, 3], 'label': int32} over a decoded split."""

  def __init__(self, path: str, labels: np.ndarray, owner: bool = False):
    self.path = path
    self.labels = np.asarray(labels, np.int32)
    self._images = None
    if owner:  # only the builder's object removes the folder
      self._finalizer = weakref.finalize(self, shutil.rmtree, os.path.dirname(path), True)

  @property
  def images(self) -> np.ndarray:
    if self._images is None:
      self._images = np.load(self.path, mmap_mode="r", allow_pickle=False)
    return self._images

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.images[index], "label": self.labels[index]}

  def __getstate__(self):  # what a worker receives: the file's name, not its pixels or its folder
    return {"path": self.path, "labels": self.labels}

  def __setstate__(self, state):
    self.path, self.labels, self._images = state["path"], state["labels"], None


def decode_split(source, labels: np.ndarray, max_gb: float, threads: int | None = None) -> DecodedSplit | None:
  """`source` decoded into a DecodedSplit, or None when it does not fit `max_gb` (0: never), the
  temporary folder has no room for it, or its tiles differ in shape (then the caller reads it
  encoded)."""
  n = len(source)
  if max_gb <= 0 or n == 0:
    return None
  first = images_lib.decode_example(source[0]["image"])
  size = n * first.nbytes
  if first.ndim != 3 or size > max_gb * 2 ** 30 or shutil.disk_usage(tempfile.gettempdir()).free < 1.1 * size:
    return None
  folder = tempfile.mkdtemp(prefix="histojax_tiles_")  # mode 0700: nobody else can plant pixels
  path = os.path.join(folder, "images.npy")
  try:
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, *first.shape))

    def fill(start: int) -> bool:
      rows = list(range(start, min(start + 256, n)))
      records = source.__getitems__(rows) if hasattr(source, "__getitems__") else [source[i] for i in rows]
      for i, record in zip(rows, records):
        image = images_lib.decode_example(record["image"])
        if image.shape != first.shape:
          return False
        images[i] = image
      return True

    # PIL releases the GIL while it inflates, so threads decode in parallel.
    with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
      uniform = all(pool.map(fill, range(0, n, 256)))
    images.flush()
    del images
  except OSError:  # the temporary folder filled up meanwhile: read encoded, as without the cache
    shutil.rmtree(folder, ignore_errors=True)
    return None
  except BaseException:
    shutil.rmtree(folder, ignore_errors=True)
    raise
  if not uniform:
    shutil.rmtree(folder, ignore_errors=True)
    return None
  return DecodedSplit(path, labels, owner=True)
