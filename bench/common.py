"""Shared bits of the benchmarks: where results go and what machine made them."""

from __future__ import annotations

import json
import os
import platform
import time

import jax

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def machine() -> dict:
  return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [d.device_kind for d in jax.devices()], "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write(name: str, result: dict, out: str | None = None, quiet: bool = False) -> str:
  path = out or os.path.join(RESULTS, f"{name}.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"benchmark": name, "machine": machine(), **result}, f, indent=2)
  if not quiet:
    print(json.dumps(result, indent=2))
  print(f"wrote {path}")
  return path
