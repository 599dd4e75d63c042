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


# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets, keyed by
# `device.device_kind`. MFU is model FLOPs per second over this; a chip not
# listed (every CPU) gets none rather than a guess.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
    "NVIDIA L4": 121e12, "NVIDIA A10G": 125e12,
}


def flops(lowered) -> float | None:
  """Model FLOPs of one call, from XLA's cost analysis of the program as lowered (None if the backend has none).

  Counted before the backend compiles it: on a GPU the compiled program's convolutions are cuDNN
  custom calls that the analysis does not count (ResNet-50's step read 0.42 GFLOP per image there
  instead of ~25); on the CPU the two counts agree within 3%.
  """
  try:
    cost = lowered.cost_analysis()
  except Exception:  # noqa: BLE001  (some backends raise instead of returning nothing)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and cost.get("flops") else None


def utilisation(call_flops: float | None, calls_per_sec: float, devices: int) -> dict:
  """Achieved FLOP/s and, where the chip's peak is known, the MFU (over all `devices`)."""
  kind = jax.devices()[0].device_kind
  achieved = None if call_flops is None else call_flops * calls_per_sec
  peak = PEAK_FLOPS.get(kind)
  return {"device_kind": kind, "achieved_tflops": None if achieved is None else round(achieved / 1e12, 4),
          "peak_tflops_per_chip": None if peak is None else peak / 1e12,
          "mfu": None if achieved is None or peak is None else round(achieved / (peak * devices), 4)}
