"""Training-step throughput of a config, on whatever devices JAX sees; optionally against PyTorch.

    python -m bench.train_step [--config configs/quickstart.py] [--steps 50] [--out FILE]
    python -m bench.train_step --against torch [--backbones resnet,se_resnet,mixed_attention]
                               [--sizes 224,cpu] [--steps 3] [--repeats 1] [--out FILE]

Times the compiled step on a fixed synthetic batch (the input pipeline is
measured by bench.input_pipeline), after one warm-up step, with the transfer
guard on (a hidden host sync would fail the run); writes JSON to
bench/results/. Reports model FLOPs per image from XLA's cost analysis and,
where the chip's peak is known (bench/common.py), the MFU.

`--against torch` runs, per backbone and size, the histojax step of
`configs/bach_dml.py` (Multi-Similarity, SGD, batch 32 of 4 classes x 8,
with its device-side colour augmentation) and then the same network, loss
and optimizer in PyTorch (bench/torch_reference.py, no augmentation), back to
back in one process, and writes the ratio of images/s (histojax / torch).
Sizes: `224` is the full network at 224 px; `cpu` is the `:cpu` variant
(its trunk, crop size and batch). Needs torch (requirements-bench.txt).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from bench import common
from histojax import config as config_lib
from histojax import mesh as mesh_lib
from histojax import step as step_lib

BACKBONES = ("resnet", "se_resnet", "mixed_attention")


@dataclasses.dataclass
class CompiledStep:
  """A config's train step compiled for the devices JAX sees, with a fixed synthetic batch to run it on."""
  config: object
  mesh: object
  lowered: object
  compiled: object
  state: object
  batch: dict
  rng: object
  compile_seconds: float

  def run(self, steps: int) -> list[float]:
    """Seconds of each of `steps` calls, with the transfer guard on (the step must never touch the host)."""
    times = []
    with jax.transfer_guard("disallow"):
      for _ in range(steps):
        start = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch, self.rng)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return times


def compile_step(config) -> CompiledStep:
  """Compiles `config`'s train step and runs it once (the warm-up)."""
  b, s, m = config.input.batch_size, config.input.image_size, config.input.m_per_class
  # No dataset is read here: heads sized "by the dataset" (-1) get the batch's classes.
  config_lib.resolve_class_counts(config, b // m)
  mesh = mesh_lib.make_mesh(config.mesh)
  trainer, state = step_lib.create(config, mesh)
  rng = jax.device_put(jax.random.key(0), mesh_lib.replicated(mesh))
  start = time.perf_counter()
  views = trainer.objective.views
  spec = step_lib.batch_spec(config, views)
  lowered = step_lib.jit_train_step(trainer, state).lower(state, spec, jax.eval_shape(lambda: rng))
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  r = np.random.default_rng(0)
  batch = {name: r.integers(0, 256, (b, s, s, 3), dtype=np.uint8) for name in spec if name != "label"}
  batch["label"] = np.repeat(np.arange(b // m), m).astype(np.int32)
  batch = mesh_lib.to_global(batch, mesh)
  state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  return CompiledStep(config, mesh, lowered, compiled, state, batch, rng, compile_s)


def measure(config, steps: int) -> dict:
  step = compile_step(config)
  times = step.run(steps)
  b, mesh = config.input.batch_size, step.mesh
  flops = common.flops(step.lowered)
  images_per_sec = b / statistics.median(times)
  return {"objective": config.objective.name, "model": config.model.to_dict(), "global_batch": b,
          "image_size": config.input.image_size,
          "devices": mesh.size, "compile_seconds": round(step.compile_seconds, 2), "steps": steps,
          "seconds_per_step": [round(t, 3) for t in times],
          "steps_per_sec": round(1 / statistics.median(times), 3), "images_per_sec": round(images_per_sec, 2),
          "step_flops_per_image": None if flops is None else round(flops / b),
          **common.utilisation(flops, images_per_sec / b, mesh.size),
          "memory": step_lib.compile_report(step.compiled)}


def dml_config(backbone: str, size: str, batch: int = 32):
  """configs/bach_dml.py for `backbone` at `size` ("224" or "cpu"), as the PyTorch reference trains it
  (SGD; `batch` images of 4 classes at the pixel sizes; the `:cpu` variant keeps its own batch)."""
  variants = f"backbone={backbone}" + (",cpu" if size == "cpu" else "")
  c = importlib.import_module("configs.bach_dml").get_config(variants)
  c.optimizer.name = "sgd"
  if size != "cpu":
    c.input.batch_size, c.input.m_per_class, c.input.image_size = batch, batch // 4, int(size)
  return c


def measure_torch(config, steps: int) -> dict:
  """The PyTorch reference's step for `config`'s network and batch: on the GPU when torch sees
  one (channels-last, bf16 autocast where the config computes in bf16, as AMP training runs),
  else on all CPU threads in float32."""
  import torch  # noqa: PLC0415  (optional: requirements-bench.txt)

  from bench import torch_reference  # noqa: PLC0415
  torch.set_num_threads(os.cpu_count())
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  on_gpu = device.type == "cuda"
  autocast = torch.bfloat16 if on_gpu and config.model.dtype == "bfloat16" else None
  m, b, s = config.model, config.input.batch_size, config.input.image_size
  model = torch_reference.Embedder(m.name, m.depth, m.width, m.embed_dim).to(device)
  step = torch_reference.make_step(model, lr=config.optimizer.lr, channels_last=on_gpu, autocast=autocast)
  r = np.random.default_rng(0)
  images = torch.from_numpy(r.integers(0, 256, (b, s, s, 3), dtype=np.uint8)).to(device)
  labels = torch.from_numpy(np.repeat(np.arange(b // config.input.m_per_class), config.input.m_per_class)).to(device)
  step(images, labels)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step(images, labels).item()  # .item() waits for the device, as block_until_ready does on ours
    times.append(time.perf_counter() - start)
  return {"torch": torch.__version__, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
          "threads": torch.get_num_threads(), "channels_last": on_gpu,
          "autocast": None if autocast is None else str(autocast),
          "parameters": torch_reference.parameter_count(model),
          "seconds_per_step": [round(t, 3) for t in times],
          "images_per_sec": round(b / statistics.median(times), 2)}


def _with_lax_convolutions(fn):
  """`fn()` with XLA's own convolution and pooling gradients (histojax.models.conv off): the old step."""
  before = os.environ.get("HISTOJAX_CONV")
  os.environ["HISTOJAX_CONV"] = "lax"
  try:
    return fn()
  finally:
    os.environ.pop("HISTOJAX_CONV") if before is None else os.environ.__setitem__("HISTOJAX_CONV", before)


def against_torch(backbones, sizes, steps: int, repeats: int, baseline: bool = False, batch: int = 32) -> dict:
  rows = []
  for size in sizes:
    for backbone in backbones:
      config = dml_config(backbone, size, batch)
      for _ in range(repeats):  # back to back, so both sides see the same load
        load = os.getloadavg()
        ours = measure(config.copy_and_resolve_references(), steps)
        theirs = measure_torch(config, steps)
        lax = _with_lax_convolutions(lambda: measure(config.copy_and_resolve_references(), steps)) if baseline else None
        rows.append({"backbone": backbone, "size": size, "image_size": config.input.image_size,
                     "batch": config.input.batch_size, "depth": config.model.depth, "width": config.model.width,
                     "histojax_images_per_sec": ours["images_per_sec"],
                     "torch_images_per_sec": theirs["images_per_sec"],
                     "ratio": round(ours["images_per_sec"] / theirs["images_per_sec"], 3),
                     **({} if lax is None else {
                         "histojax_lax_conv_images_per_sec": lax["images_per_sec"],
                         "ratio_lax_conv": round(lax["images_per_sec"] / theirs["images_per_sec"], 3)}),
                     "load_average_1min_before_after": [round(load[0], 2), round(os.getloadavg()[0], 2)],
                     "histojax": ours, "torch": theirs, **({} if lax is None else {"histojax_lax_conv": lax})})
        print({k: v for k, v in rows[-1].items() if k not in ("histojax", "torch")}, flush=True)
  return {"against": "torch", "steps": steps, "rows": rows,
          "note": "histojax step includes its device-side colour augmentation; torch's has none"}


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if FLAGS.against == "torch":
    result = against_torch(FLAGS.backbones.split(","), FLAGS.sizes.split(","), FLAGS.steps, FLAGS.repeats,
                           FLAGS.baseline, FLAGS.batch)
    common.write("train_step_vs_torch", result, FLAGS.out, quiet=True)
  else:
    common.write("train_step", measure(FLAGS.config, FLAGS.steps), FLAGS.out)


if __name__ == "__main__":
  from ml_collections import config_flags  # noqa: PLC0415
  config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config file[:variant].")
  flags.DEFINE_integer("steps", 50, "Timed steps after warm-up.")
  flags.DEFINE_enum("against", None, ["torch"], "Also time the PyTorch reference (bench/torch_reference.py).")
  flags.DEFINE_string("backbones", ",".join(BACKBONES), "With --against: comma-separated backbones.")
  flags.DEFINE_string("sizes", "224,cpu", "With --against: image sizes in px, or `cpu` for the :cpu variant.")
  flags.DEFINE_integer("repeats", 1, "With --against: back-to-back pairs per backbone and size.")
  flags.DEFINE_bool("baseline", False, "With --against: also time histojax with XLA's own convolution "
                    "gradients (HISTOJAX_CONV=lax), the step before histojax.models.conv.")
  flags.DEFINE_integer("batch", 32, "With --against: the batch at pixel sizes (32: the paper's; 4 classes).")
  flags.DEFINE_string("out", None, "JSON path; default bench/results/train_step[_vs_torch].json.")
  app.run(main)
