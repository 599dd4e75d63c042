"""What a person watching a run sees: a progress bar and TensorBoard scalars.

Scalars also go, one JSON object per logged step, to
`<workdir>/train_metrics.jsonl`, readable without TensorBoard; an evaluation
during training (`histojax.evaluators`) adds a row of its own at its step.
Only process 0 draws the bar and writes; the others stay quiet.
"""

from __future__ import annotations

import contextlib
import json
import time

import jax
import numpy as np
import tqdm
from absl import flags, logging
from etils import epath
from tensorboardX import SummaryWriter  # event files without TensorFlow (gs:// too)

from histojax import fileio


def info(message: str, *args) -> None:
  """A line for the person running the job (process 0 only), kept clear of the bar.

  Library INFO logs (Orbax logs every save step) stay off; these lines are
  the run's own narrative.
  """
  if jax.process_index() == 0:
    tqdm.tqdm.write(f"[histojax {time.strftime('%H:%M:%S')}] " + (message % args if args else message))


def quiet_libraries() -> None:
  """Library logs (Orbax, TFDS, XLA) at WARNING unless --verbosity was given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


class JsonLines:
  """A JSON-lines file that grows across runs (a resumed run adds to it).

  On a local disk rows are appended and flushed one by one. Object stores
  (gs://) cannot append, so there the file is rewritten whole: at most every
  `rewrite_seconds`, and at `close`.
  """

  def __init__(self, path: epath.Path, rewrite_seconds: float = 60.0):
    self._path, self._rewrite_seconds = path, rewrite_seconds
    self._file = path.open("a") if fileio.is_local(path) else None
    self._lines = []  # object store only: every row, earlier runs' included
    if self._file is None and path.exists():
      self._lines = path.read_text().splitlines(keepends=True)
    self._written = time.monotonic()

  def append(self, row: dict) -> None:
    line = json.dumps(row) + "\n"
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
      return
    self._lines.append(line)
    if time.monotonic() - self._written >= self._rewrite_seconds:
      self._rewrite()

  def _rewrite(self) -> None:
    self._path.write_text("".join(self._lines))
    self._written = time.monotonic()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    else:
      self._rewrite()


class Monitor:
  def __init__(self, workdir: epath.PathLike, total_steps: int, first_step: int):
    self.enabled = jax.process_index() == 0
    self._bar = tqdm.tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True,
                          disable=not self.enabled, desc="train")
    self._writer = self._jsonl = None
    if self.enabled:
      self._writer = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
      self._jsonl = JsonLines(epath.Path(workdir) / "train_metrics.jsonl")
    self._last = (first_step, time.perf_counter())

  def advance(self, step: int) -> None:
    self._bar.update(step - self._bar.n)

  def log(self, step: int, scalars: dict, rate: bool = True) -> None:
    """Writes scalars; with `rate`, adds steps/s measured since the previous such call."""
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    if rate:
      last_step, last_time = self._last
      now = time.perf_counter()
      if step > last_step:
        scalars["steps_per_sec"] = (step - last_step) / (now - last_time)
      self._last = (step, now)
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name, value, step)
    self._jsonl.append({"step": step, **scalars})
    if "loss" in scalars:
      self._bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside is left out of steps/s, which then counts training alone
    (big_vision's chrono pauses alike around its evaluators)."""
    start = time.perf_counter()
    try:
      yield
    finally:
      step, last_time = self._last
      self._last = (step, last_time + time.perf_counter() - start)

  def close(self) -> None:
    self._bar.close()
    if self._writer is not None:
      self._writer.close()
      self._jsonl.close()
