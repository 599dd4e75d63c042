"""Embedding throughput and peak memory per foundation-model preset: histojax against timm / transformers.

    python -m bench.encoders --torch_python /tmp/refvenv/bin/python            # the ViT-S/B/L presets, CPU
    python -m bench.encoders --presets uni2_h,midnight --dtype bfloat16 --batch 64   # giants: bench/gpu.sh

For each preset the same full-depth random weights (tests/encoder_fixtures.py,
the published layout) are written as a hub folder and converted; then one
subprocess per framework loads them, embeds `--steps` batches of `--batch`
images at the preset's input size (224 px) after one warm-up batch, and
reports images/s and its peak resident memory (weights, activations, runtime).
Both run on the same cores (`--threads`, pinned) and dtype; the reference is
timm for timm presets and transformers for the others, computing the card's
feature. The reference interpreter (`--torch_python`) needs torch, timm and
transformers (see tests/fixtures/make_encoder_parity.py); histojax never does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

CPU_PRESETS = ("kaiko_vits16", "kaiko_vits8", "kaiko_vitb16", "kaiko_vitb8", "phikon", "hibou_b", "uni", "phikon_v2",
               "hibou_l", "kaiko_vitl14")
GIANT_PRESETS = ("uni2_h", "virchow", "virchow2", "h_optimus_0", "h_optimus_1", "prov_gigapath", "midnight")
_TORCH_CLASSES = {"timm.layers.SwiGLUPacked": ("timm.layers", "SwiGLUPacked"), "torch.nn.SiLU": ("torch.nn", "SiLU")}


def _peak_mib() -> float:
  """This process's own peak RSS. Not ru_maxrss: it survives fork + exec, so a worker would report the
  parent's resident weights; VmHWM belongs to the address space exec made."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(embed, batch, steps) -> float:
  embed(batch)  # warm-up: compilation (histojax) or first-call allocations (torch)
  start = time.perf_counter()
  for _ in range(steps):
    embed(batch)
  return steps * len(batch) / (time.perf_counter() - start)


def histojax_worker(args, spec) -> dict:
  import jax  # noqa: PLC0415  (late: the parent process never loads a backend)
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from histojax import models  # noqa: PLC0415
  from histojax.weights import store  # noqa: PLC0415

  manifest = json.load(open(os.path.join(args.weights, "manifest.json")))
  cfg = models.model_config(manifest["model"]["name"])
  cfg.update(manifest["model"])
  cfg.dtype = args.dtype
  graphdef, abstract = nnx.split(models.abstract_model(cfg))
  state = store.apply(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract), args.weights)
  features = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x).astype(jnp.float32))
  size = spec["input_size"]
  batch = jnp.asarray(np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8))
  result = {"images_per_sec": _time(lambda x: np.asarray(features(state, x)), batch, args.steps),
            "device": jax.devices()[0].device_kind}
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    result["peak_device_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
  return result


def torch_worker(args, spec) -> dict:
  import importlib  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415  (optional dependency: only in the reference interpreter)

  torch.set_num_threads(args.threads)
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  if spec["format"] == "timm":
    import timm  # noqa: PLC0415
    kwargs = {k: getattr(importlib.import_module(_TORCH_CLASSES[v][0]), _TORCH_CLASSES[v][1])
              if isinstance(v, str) and v in _TORCH_CLASSES else v for k, v in spec["card_kwargs"].items()}
    kwargs.pop("depth", None)
    model = timm.create_model(f"local-dir:{args.hub}", pretrained=True, **kwargs)
  else:
    import transformers  # noqa: PLC0415
    if spec["hub_config"].get("num_register_tokens"):  # Hibou's remote code is not available offline
      fields = {k: v for k, v in spec["hub_config"].items() if k not in ("model_type", "architectures")}
      config = transformers.Dinov2WithRegistersConfig(**fields)
      model = transformers.Dinov2WithRegistersModel.from_pretrained(args.hub, config=config, use_kernels=False)
    else:
      model = transformers.AutoModel.from_pretrained(args.hub, use_kernels=False)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = model.eval().to(device=device, dtype=dtype)
  mean = torch.tensor(spec["mean"], device=device).view(1, 3, 1, 1) * 255
  std = torch.tensor(spec["std"], device=device).view(1, 3, 1, 1) * 255
  size = spec["input_size"]
  batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8))
  batch = batch.to(device)

  def embed(images):
    if device == "cuda":
      torch.cuda.synchronize()
    with torch.inference_mode():
      x = ((images.permute(0, 3, 1, 2).float() - mean) / std).to(dtype)
      out = model(x) if spec["format"] == "timm" else model(pixel_values=x).last_hidden_state
      if out.ndim == 3:
        prefix = getattr(model, "num_prefix_tokens", 1)
        out = torch.cat([out[:, 0], out[:, prefix:].mean(1)], -1) if spec["feature"] == "token_patch_mean" else out[:, 0]
      out = out.float().cpu()  # as histojax's result: on the host
    return out
  result = {"images_per_sec": _time(embed, batch, args.steps), "device": device}
  if device == "cuda":
    result["peak_device_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
  return result


def _spec(name: str) -> dict:
  from histojax.models import embedder, presets  # noqa: PLC0415
  p = presets.get(name)
  mean, std = embedder.INPUT_NORMS[p.input_norm]
  return {"format": p.format, "card_kwargs": p.card_kwargs, "hub_config": p.hub_config, "feature": p.feature,
          "input_size": p.input_size, "mean": mean, "std": std}


def run_worker(framework: str, python: str, name: str, hub: str, weights: str, args) -> dict:
  cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:args.threads])
  # Both workers are pinned to the same `threads` cores (taskset); torch also sizes its pool to them.
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  cmd = ["taskset", "-c", cores, python, "-m", "bench.encoders", "--worker", framework, "--presets", name, "--hub",
         hub, "--weights", weights, "--batch", str(args.batch), "--steps", str(args.steps), "--threads",
         str(args.threads), "--dtype", args.dtype, "--spec", json.dumps(_spec(name))]
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
  if result.returncode:
    return {"error": result.stderr.strip().splitlines()[-1:] or ["failed"]}
  return json.loads(result.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default=",".join(CPU_PRESETS))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--torch_python", default=sys.executable, help="interpreter with torch, timm, transformers")
  parser.add_argument("--out", default=None)
  parser.add_argument("--worker", choices=("histojax", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--hub", help=argparse.SUPPRESS)
  parser.add_argument("--weights", help=argparse.SUPPRESS)
  parser.add_argument("--spec", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    spec = json.loads(args.spec)
    result = (histojax_worker if args.worker == "histojax" else torch_worker)(args, spec)
    print(json.dumps({**result, "peak_rss_mib": round(_peak_mib(), 1)}))
    return

  from bench import common  # noqa: PLC0415
  from histojax import convert, models  # noqa: PLC0415
  from histojax.models import presets  # noqa: PLC0415
  from tests import encoder_fixtures as fx  # noqa: PLC0415
  rows = {}
  for name in args.presets.split(","):
    preset = presets.get(name)
    root = tempfile.mkdtemp(prefix=f"bench_{name}_")
    try:
      hub, weights = os.path.join(root, "hub"), os.path.join(root, "weights")
      fx.write_hub_folder(preset, hub, depth=preset.architecture["layers"])
      convert.convert(preset.format, hub, weights, preset=name)
      row = {"parameters": models.parameter_count(models.abstract_model(models.model_config(name)).backbone)}
      row["histojax"] = run_worker("histojax", sys.executable, name, hub, weights, args)
      row["reference"] = run_worker("torch", args.torch_python, name, hub, weights, args)
      row["reference_library"] = preset.format
      if "images_per_sec" in row["histojax"] and "images_per_sec" in row["reference"]:
        row["speed_ratio"] = round(row["histojax"]["images_per_sec"] / row["reference"]["images_per_sec"], 3)
      rows[name] = row
      print(name, json.dumps(row), flush=True)
    finally:
      shutil.rmtree(root, ignore_errors=True)
  common.write("encoders", {"batch": args.batch, "steps": args.steps, "threads": args.threads, "dtype": args.dtype,
                            "input_size": 224, "presets": rows}, args.out, quiet=True)


if __name__ == "__main__":
  main()
