"""What a person watching a run sees: a progress bar and TensorBoard scalars.

Scalars also go, one JSON object per logged step, to
`<workdir>/train_metrics.jsonl`, readable without TensorBoard. Only process 0
draws the bar and writes; the others stay quiet.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
import tqdm
from etils import epath


def info(message: str, *args) -> None:
  """A line for the person running the job (process 0 only), kept clear of the bar.

  Library INFO logs (Orbax logs every save step) stay off; these lines are
  the run's own narrative.
  """
  if jax.process_index() == 0:
    tqdm.tqdm.write(f"[histojax {time.strftime('%H:%M:%S')}] " + (message % args if args else message))


def quiet_libraries() -> None:
  """Library logs (Orbax, TFDS, XLA) at WARNING unless --verbosity was given."""
  from absl import flags, logging
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


class Monitor:
  def __init__(self, workdir: epath.PathLike, total_steps: int, first_step: int):
    self.enabled = jax.process_index() == 0
    self._bar = tqdm.tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True,
                          disable=not self.enabled, desc="train")
    self._writer = self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # event files without TensorFlow
      self._writer = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
      self._jsonl = (epath.Path(workdir) / "train_metrics.jsonl").open("a")
    self._last = (first_step, time.perf_counter())

  def advance(self, step: int) -> None:
    self._bar.update(step - self._bar.n)

  def log(self, step: int, scalars: dict) -> None:
    """Writes scalars; adds steps/s measured since the previous call."""
    last_step, last_time = self._last
    now = time.perf_counter()
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    if step > last_step:
      scalars["steps_per_sec"] = (step - last_step) / (now - last_time)
    self._last = (step, now)
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    self._bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}", refresh=False)

  def close(self) -> None:
    self._bar.close()
    if self._writer is not None:
      self._writer.close()
      self._jsonl.close()
