"""Interleaved A/B of the training step: histojax.models.conv on (`matmul`, HISTOJAX_CONV=matmul) and off (`lax`, HISTOJAX_CONV=lax).

    REPS=3 python bench/conv_ab.py cpu|224 resnet|se_resnet|mixed_attention lax,matmul [OUT.json]

Both steps are compiled first, then timed alternately, one step each per
round, so a shared machine's load hits both alike (bench.train_step's
--baseline times them one after the other instead).
"""
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.getcwd())
from bench import common, train_step  # noqa: E402
from histojax import config as config_lib, mesh as mesh_lib, step as step_lib  # noqa: E402

size = sys.argv[1]; backbone = sys.argv[2] if len(sys.argv) > 2 else "resnet"
c = train_step.dml_config(backbone, size)
b, s, m = c.input.batch_size, c.input.image_size, c.input.m_per_class
config_lib.resolve_class_counts(c, b // m)
mesh = mesh_lib.make_mesh(c.mesh)
out = {}
r = np.random.default_rng(0)
batch = mesh_lib.to_global({"image": r.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
                            "label": np.repeat(np.arange(b // m), m).astype(np.int32)}, mesh)
rng = jax.random.key(0)
for name in sys.argv[3].split(","):
  os.environ["HISTOJAX_CONV"] = name
  trainer, state = step_lib.create(c, mesh)
  spec = step_lib.batch_spec(c, 1)
  t = time.perf_counter()
  comp = step_lib.jit_train_step(trainer, state).lower(state, spec, jax.eval_shape(lambda: rng)).compile()
  print(name, "compile", round(time.perf_counter() - t, 1), flush=True)
  out[name] = [comp, state]
times = {name: [] for name in out}
for rep in range(int(os.environ.get("REPS", "2"))):
  for name, (comp, state) in out.items():
    t = time.perf_counter()
    state, met = comp(state, batch, rng); jax.block_until_ready(met)
    out[name][1] = state
    times[name].append(round(time.perf_counter() - t, 3))
    print(name, times[name][-1], "s/step", "load", os.getloadavg()[0], flush=True)
result = {"backbone": backbone, "size": size, "batch": b, "image_size": s, "seconds_per_step": times,
          "median": {k: statistics.median(v) for k, v in times.items()}, "load_average_1min": os.getloadavg()[0]}
if len(sys.argv) > 4:
  common.write("conv_ab", result, sys.argv[4])
