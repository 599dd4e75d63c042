"""Train a retrieval model, checkpoint it, and evaluate it at the end.

    python -m histojax.train --config configs/quickstart.py --workdir /tmp/hj-quickstart

`--config` takes `file.py[:variant]` and `--config.a.b=value` overrides.
Running the same command again resumes from the latest checkpoint in the
workdir; a finished run only reports (or, if missing, computes) its metrics.

Multi-host: every process runs this same command (see histojax/distributed.py
for how a multi-process run is detected) with a workdir all processes can
reach, e.g. gs://bucket/run. SIGTERM (preemption) saves a checkpoint at the
next step all processes agree on and exits with status 0; rerunning resumes.
"""

from __future__ import annotations

import json

import jax
import ml_collections
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from histojax import checkpoint, datasets, distributed, evaluate, evaluators, preemption, report  # noqa: F401  (datasets: registers the builders)
from histojax import config as config_lib
from histojax import mesh as mesh_lib
from histojax import monitor as monitor_lib
from histojax import sharding as sharding_lib
from histojax import step as step_lib
from histojax.data import pipeline, sources


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike,
                       stop_at: int | None = None) -> dict:
  """Trains to `config.total_steps` (resuming if possible); returns eval metrics.

  `stop_at` ends this run early at that step, with a checkpoint, as a
  preemption (SIGTERM) does; the schedule still follows `total_steps`, so a
  later run continues exactly. Returns {} when evaluation is off or the run
  stopped early.
  """
  config_lib.validate(config)
  adopted = config_lib.adopt_converted_architecture(config)
  if adopted:  # e.g. a reduced-depth or other-grid conversion of the preset
    monitor_lib.info("model fields from init_from's weights: %s",
                     ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in adopted.items()))
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)

  # --- Data -----------------------------------------------------------------
  sources.ensure_prepared(config.dataset)
  config_lib.resolve_class_counts(config, len(sources.class_names(config.dataset.name, config.dataset.data_dir)))
  if jax.process_index() == 0:
    config_lib.save(config, workdir / "config.json")
  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.local_batch_size(config.input.batch_size, mesh)
  monitor_lib.info("%s; mesh %s", distributed.describe(), dict(mesh.shape))
  source = sources.open_split(config.dataset.name, config.dataset.train_split, config.dataset.data_dir)
  labels = sources.read_metadata(source)["label"]
  trainer, state = step_lib.create(config, mesh)
  views = trainer.objective.views
  data_iter = iter(pipeline.train_dataset(source, labels, config.input, config.seed,
                                          jax.process_index(), jax.process_count(), views))

  # --- State: checkpoint in workdir, else config.init_from, else fresh --------
  monitor_lib.info(sharding_lib.describe(state))
  mngr = checkpoint.manager(workdir, config.checkpoint)
  start = mngr.latest_step() or 0
  if mngr.latest_step() is not None:
    state, data_state = checkpoint.restore(mngr, start, state)
    data_iter.set_state(data_state)
    monitor_lib.info("resumed from %s at step %d", workdir / "checkpoints", start)
  elif config.init_from:
    state = trainer.objective.load_weights(state, config.init_from)
    monitor_lib.info("initialised the backbone from %s", config.init_from)
    if config.total_steps == 0:  # evaluation only: keep the state where `histojax.evaluate` looks
      checkpoint.save(mngr, 0, state, data_iter.get_state(), force=True)

  if start >= config.total_steps:
    mngr.close()
    return _report_finished(config, workdir, trainer, state, start)

  # --- Compile ahead, so shape and memory problems show before step 1 ---------
  rng = jax.random.key(config.seed)
  compiled = step_lib.jit_train_step(trainer, state).lower(
      state, step_lib.batch_spec(config, views), jax.eval_shape(lambda: rng)).compile()
  monitor_lib.info(step_lib.compile_report(compiled))
  during = evaluators.from_config(config, trainer)  # None unless eval.every_steps

  # --- Loop: a SIGTERM ends it after the current step, with a checkpoint -----
  last = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
  mon = monitor_lib.Monitor(workdir, config.total_steps, start)
  preempted = False
  with preemption.Watcher() as watcher:
    for step in range(start + 1, last + 1):
      batch = mesh_lib.to_global(next(data_iter), mesh)
      state, metrics = compiled(state, batch, rng)
      if step % config.log_every == 0 or step == config.total_steps:
        mon.log(step, jax.device_get(metrics))
      mon.advance(step)
      preempted = watcher.reached(step)
      checkpoint.save(mngr, step, state, data_iter.get_state(), force=step == last or preempted)
      if preempted:
        last = step
        break
      if during is not None and during.due(step):
        with mon.paused():  # steps/s counts training only
          mon.log(step, during.run(state), rate=False)
    mon.close()
    mngr.wait_until_finished()  # the preemption checkpoint is on disk before we exit
    mngr.close()

  if preempted or last < config.total_steps:
    monitor_lib.info("stopped at step %d (%s); checkpoint saved, rerun the same command to resume",
                     last, "SIGTERM" if preempted else "stop_at")
    return {}
  if not config.eval.at_end:
    return {}
  return evaluate.evaluate(config, workdir, trainer, state, last)


def _report_finished(config, workdir: epath.Path, trainer, state, step: int) -> dict:
  metrics_path = workdir / "eval" / "metrics.json"
  if metrics_path.exists():
    results = json.loads(metrics_path.read_text())
    if results.get("step") == step:
      monitor_lib.info("training finished at step %d; reporting %s", step, metrics_path)
      if jax.process_index() == 0:
        print(report.format_table(results))
      return results
  if not config.eval.at_end:
    monitor_lib.info("training finished at step %d; evaluation is off", step)
    return {}
  return evaluate.evaluate(config, workdir, trainer, state, step)


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go (any etils.epath path, "
                      "e.g. gs://bucket/run; shared by all processes).", required=True)
  distributed.define_flags()


def main(argv):
  """The command line; the work is `train_and_evaluate(config, workdir)`."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if flags.FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config configs/quickstart.py")
  distributed.initialize_from_flags()  # before any JAX computation
  monitor_lib.quiet_libraries()
  train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
