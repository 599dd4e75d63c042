"""Where a train step's time goes, kernel by kernel: a `jax.profiler` trace read back per HLO op.

    python -m bench.profile_step [--config configs/bach_dml.py:cpu] [--steps 5] [--top 25] [--out FILE]

Compiles the config's step (as bench.train_step does: fixed synthetic batch, one warm-up), traces
`--steps` calls with `jax.profiler`, and sums the duration of every kernel (XLA CPU's thunks, GPU
kernels where the backend names their HLO op) per HLO instruction of the step's module. Each
instruction is put in a kind by what it computes (the opcodes of its fused computation:
convolution, dot, pooling, reduction, copy/transpose, elementwise) and a pass by its JAX name
stack (`transpose(...)` is the backward pass, `jvp(...)` the forward, the rest is augmentation,
optimizer and bookkeeping; ops XLA created without a JAX name are `unnamed`). Writes JSON: per kind, per pass, and the `--top` instructions with
their shapes and the JAX operation they came from.

Kernel durations are summed over threads, so with intra-op parallelism their sum can exceed the
step's wall time; the shares are of the summed kernel time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time

import jax
from absl import app, flags

from bench import common
from bench import train_step

# Order matters: an instruction falls in the first kind whose opcodes it contains.
KINDS = (
    ("convolution", {"convolution"}),
    ("dot", {"dot"}),
    ("pooling", {"reduce-window", "select-and-scatter"}),
    ("reduction", {"reduce", "all-reduce"}),
    ("gather/scatter", {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}),
    ("copy/transpose", {"copy", "transpose"}),
)
_LAYOUT_ONLY = {"parameter", "bitcast", "copy", "transpose", "reshape", "tuple", "get-tuple-element", "constant"}

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def parse_hlo(text: str) -> dict[str, dict]:
  """Every instruction of an HLO module's text: {name: {opcode, shape, op_name, opcodes}}, where
  `opcodes` is the set of opcodes it computes (its own, or its fused/called computation's)."""
  computations: dict[str, list[dict]] = {}
  current = None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header and not line.startswith(" "):
      current = computations.setdefault(header.group(1), [])
      continue
    instruction = _INSTRUCTION.match(line)
    if instruction and current is not None:
      calls = _CALLS.search(line)
      op_name = _OP_NAME.search(line)
      current.append({"name": instruction.group(1), "shape": instruction.group(2),
                      "opcode": instruction.group(3), "calls": calls.group(1) if calls else None,
                      "op_name": op_name.group(1) if op_name else ""})

  def opcodes(computation: str, seen: frozenset = frozenset()) -> set[str]:
    found = set()
    for inst in computations.get(computation, ()):
      found.add(inst["opcode"])
      if inst["calls"] and inst["calls"] not in seen:
        found |= opcodes(inst["calls"], seen | {computation})
    return found

  def first_op_name(computation: str) -> str:
    # A fusion often carries no metadata of its own; its fused instructions do.
    return next((i["op_name"] for i in computations.get(computation, ()) if i["op_name"]), "")

  out = {}
  for computation, instructions in computations.items():
    for inst in instructions:
      ops = {inst["opcode"]} | (opcodes(inst["calls"]) if inst["calls"] else set())
      op_name = inst["op_name"] or (first_op_name(inst["calls"]) if inst["calls"] else "")
      out[inst["name"]] = {"opcode": inst["opcode"], "shape": inst["shape"], "op_name": op_name,
                           "opcodes": ops, "computation": computation}
  return out


def kind_of(opcodes: set[str]) -> str:
  for kind, members in KINDS:
    if kind == "copy/transpose":
      if opcodes <= _LAYOUT_ONLY | {"fusion"} and opcodes & members:
        return kind
    elif opcodes & members:
      return kind
  return "elementwise"


def pass_of(op_name: str) -> str:
  """backward, forward, other (no differentiation in its name), or unnamed (XLA made it and kept no
  JAX name: e.g. a convolution's kernel gradient rewritten as another convolution)."""
  if not op_name:
    return "unnamed"
  if "transpose(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "other"


def jax_op_of(op_name: str) -> str:
  """The JAX primitive an instruction came from: the last part of its name, e.g. `select_n` of
  `jit(step)/transpose(jvp())/select_n` (a fusion is named after its first named instruction)."""
  return op_name.rsplit("/", 1)[-1] or "(none)"


def kernel_events(trace_dir: str) -> list[dict]:
  """The complete events of a `jax.profiler.trace(..., create_perfetto_trace=True)` folder that
  name an HLO op (one per kernel run)."""
  paths = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}/plugins/profile/")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def attribute(events: list[dict], hlo: dict[str, dict], module: str, steps: int) -> dict:
  """Kernel seconds per step, per kind, per pass and per instruction, of `module`'s events."""
  per_op = collections.Counter()
  for e in events:
    if e["args"].get("hlo_module") == module:
      per_op[e["args"]["hlo_op"]] += e["dur"] * 1e-6 / steps
  total = sum(per_op.values())
  by_kind, by_pass, by_jax_op = collections.Counter(), collections.Counter(), collections.Counter()
  unmatched = 0.0
  for name, seconds in per_op.items():
    inst = hlo.get(name)
    if inst is None:
      unmatched += seconds
      continue
    by_kind[kind_of(inst["opcodes"])] += seconds
    by_pass[pass_of(inst["op_name"])] += seconds
    by_jax_op[f'{kind_of(inst["opcodes"])} {pass_of(inst["op_name"])} {jax_op_of(inst["op_name"])}'] += seconds

  def table(counter):
    return {k: {"seconds": round(v, 6), "share": round(v / total, 4) if total else None}
            for k, v in counter.most_common()}

  top = [{"hlo_op": name, "seconds": round(sec, 6), "share": round(sec / total, 4) if total else None,
          **({"kind": kind_of(hlo[name]["opcodes"]), "pass": pass_of(hlo[name]["op_name"]),
              "shape": hlo[name]["shape"], "op_name": hlo[name]["op_name"]} if name in hlo else {})}
         for name, sec in per_op.most_common()]
  return {"kernel_seconds_per_step": round(total, 6), "kernels_per_step": len(per_op),
          "unmatched_seconds": round(unmatched, 6), "by_kind": table(by_kind), "by_pass": table(by_pass),
          "by_jax_op": table(by_jax_op), "top": top}


def profile(config, steps: int, top: int) -> dict:
  step = train_step.compile_step(config)
  module = step.compiled.as_text()
  name = re.match(r"HloModule (\S+?),", module)
  hlo = parse_hlo(module)
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      times = step.run(steps)
    traced_s = time.perf_counter() - start
    events = kernel_events(trace_dir)
  result = attribute(events, hlo, name.group(1) if name else "", steps)
  result["top"] = result["top"][:top]
  untraced = step.run(steps)  # the profiler's own cost, for the reader
  return {"config": {"model": config.model.to_dict(), "batch": config.input.batch_size,
                     "image_size": config.input.image_size, "objective": config.objective.name},
          "devices": step.mesh.size, "steps": steps, "load_average_1min": round(os.getloadavg()[0], 2),
          "wall_seconds_per_step_traced": round(statistics.median(times), 4),
          "wall_seconds_per_step_untraced": round(statistics.median(untraced), 4),
          "trace_seconds": round(traced_s, 2), **result}


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  result = profile(FLAGS.config, FLAGS.steps, FLAGS.top)
  common.write("profile_step", result, FLAGS.out, quiet=True)
  print(f"wall {result['wall_seconds_per_step_untraced']} s/step (traced {result['wall_seconds_per_step_traced']}), "
        f"kernels {result['kernel_seconds_per_step']} s/step over {result['kernels_per_step']} instructions")
  for title in ("by_kind", "by_pass"):
    print(title, {k: f"{v['seconds']:.3f} s ({v['share']:.0%})" for k, v in result[title].items()})
  print("by kind, pass and JAX primitive:")
  for key, v in list(result["by_jax_op"].items())[:FLAGS.top]:
    print(f"{v['seconds']:8.4f} {v['share']:6.1%}  {key}")
  for row in result["top"]:
    print(f"{row['seconds']:8.4f} {row.get('kind', '?'):14} {row.get('pass', '?'):8} {row['hlo_op'][:40]:40} "
          f"{row.get('shape', '')[:40]:40} {row.get('op_name', '')[-70:]}")


if __name__ == "__main__":
  from ml_collections import config_flags  # noqa: PLC0415
  config_flags.DEFINE_config_file("config", "configs/bach_dml.py:cpu", "Config file[:variant].")
  flags.DEFINE_integer("steps", 5, "Traced steps after warm-up.")
  flags.DEFINE_integer("top", 25, "Instructions listed, slowest first.")
  flags.DEFINE_string("out", None, "JSON path; default bench/results/profile_step.json.")
  app.run(main)
