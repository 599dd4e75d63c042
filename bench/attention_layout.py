"""ViT self-attention, heads-major (histojax.models.vit.Attention) against the old token-major einsums.

    python -m bench.attention_layout [--tokens 197,785] [--batch 8] [--out bench/results/attention_layout.json]

Both compute the same thing on the same projection weights (ViT-B: width 768, 12 heads); the
token-major form kept q, k, v as [b, n, heads, hd] and let each einsum put heads first, which
XLA's CPU backend did with copies around both products. Timed interleaved, one call each per
round, so a shared machine's load hits both alike; the median of the rounds is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common
from histojax.models import vit


def token_major(attn: vit.Attention, x):
  """The layout before: heads inside the token axis; the einsums transpose."""
  b, n, d = x.shape
  hd = d // attn.heads
  qkv = attn.qkv(x).reshape(b, n, 3, attn.heads, hd)
  q, k, v = qkv[:, :, 0] * hd ** -0.5, qkv[:, :, 1], qkv[:, :, 2]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return attn.proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", default="197,785", help="sequence lengths: 197 = 224 px at patch 16, 785 at patch 8")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--width", type=int, default=768)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  attn = vit.Attention(args.width, args.heads, dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(attn)
  layouts = {"heads_major": jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)),
             "token_major": jax.jit(lambda s, x: token_major(nnx.merge(graphdef, s), x))}
  rows = {}
  for n in (int(t) for t in args.tokens.split(",")):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((args.batch, n, args.width), np.float32))
    outs = {name: np.asarray(f(state, x)) for name, f in layouts.items()}  # compiles; also the same answer?
    times = {name: [] for name in layouts}
    for _ in range(args.rounds):
      for name, f in layouts.items():
        start = time.perf_counter()
        f(state, x).block_until_ready()
        times[name].append((time.perf_counter() - start) * 1e3)
    median = {name: round(statistics.median(t), 2) for name, t in times.items()}
    rows[str(n)] = {"median_ms": median, "speedup": round(median["token_major"] / median["heads_major"], 2),
                    "max_abs_difference": float(np.abs(outs["heads_major"] - outs["token_major"]).max())}
    print(n, rows[str(n)], flush=True)
  common.write("attention_layout", {"batch": args.batch, "width": args.width, "heads": args.heads,
                                    "rounds": args.rounds, "tokens": rows}, args.out)


if __name__ == "__main__":
  main()
