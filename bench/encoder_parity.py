"""How close histojax's features come to timm / transformers, per preset, in float32 and bfloat16.

    python -m bench.encoder_parity [--presets uni2_h,midnight] [--out bench/results/encoder_parity.json]

The tests hold float32 to cosine >= 0.99999 (tests/test_encoders.py); this
records the figures themselves, and the bf16 ones (parameters float32,
activations bf16, attention logits and softmax float32) against the float32
references in tests/fixtures/encoders/parity.npz. Same seeded full-width
2-block weights as the tests; the bf16 gap grows with depth, so a full-depth
model sits lower than these.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common
from histojax import convert, models
from histojax.models import presets
from histojax.weights import store
from tests import encoder_fixtures as fx

PARITY = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "encoders", "parity.npz")


def cosine(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def figures(name: str, reference) -> dict:
  preset = presets.get(name)
  native, other = fx.images(preset)
  out = {}
  with tempfile.TemporaryDirectory() as root:
    fx.write_hub_folder(preset, os.path.join(root, "hub"))
    manifest = convert.convert(preset.format, os.path.join(root, "hub"), os.path.join(root, "w"), preset=name)
    for dtype in ("float32", "bfloat16"):
      cfg = models.model_config(name)
      cfg.update(manifest["model"])
      cfg.dtype = dtype
      graphdef, abstract = nnx.split(models.abstract_model(cfg))
      state = store.apply(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract), os.path.join(root, "w"))
      features = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s).features(x).astype(jnp.float32))
      for split, images in (("native", native), ("other", other)):
        if f"{name}.{split}" in reference.files:
          out[f"{dtype}_{split}_min_cosine"] = float(cosine(features(state, images), reference[f"{name}.{split}"]).min())
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default=",".join(presets.names()))
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  reference = np.load(PARITY)
  rows = {}
  for name in args.presets.split(","):
    rows[name] = figures(name, reference)
    print(name, {k: round(v, 7) for k, v in rows[name].items()}, flush=True)
  common.write("encoder_parity", {"reference": str(reference["versions"]), "depth": fx.DEPTH, "presets": rows},
               args.out, quiet=True)


if __name__ == "__main__":
  main()
