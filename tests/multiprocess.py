"""Runs `python -m histojax.train` as a real multi-process JAX job on localhost.

Each process is a separate interpreter with its own fake CPU devices; they
join through `jax.distributed` with process 0 listening on 127.0.0.1, and
their collectives go over Gloo, as on a CPU cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_command(workdir, data_dir, overrides: dict, config: str = "configs/quickstart.py:tiny") -> list[str]:
  cmd = [sys.executable, "-m", "histojax.train", "--config", config, "--workdir", str(workdir),
         f"--config.dataset.data_dir={data_dir}", "--config.dataset.prepare_if_missing=False"]
  return cmd + [f"--config.{k}={v}" for k, v in overrides.items()]


def env_with_devices(n: int) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


@dataclasses.dataclass
class Job:
  procs: list[subprocess.Popen]
  logs: list[Path]

  def wait(self, timeout: float = 400) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in self.procs:
      try:
        codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
      except subprocess.TimeoutExpired:
        self.kill()
        raise AssertionError(f"job did not finish in {timeout} s\n{self.tails()}") from None
    return codes

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def tails(self, lines: int = 25) -> str:
    out = []
    for i, log in enumerate(self.logs):
      text = log.read_text(errors="replace").splitlines() if log.exists() else []
      out.append(f"--- process {i} ({log}) ---\n" + "\n".join(text[-lines:]))
    return "\n".join(out)


def launch(cmd: list[str], num_processes: int, devices_per_process: int, log_dir: Path,
           new_session: bool = False) -> Job:
  """Starts `num_processes` copies of `cmd` (the same command, as on a pod)."""
  log_dir.mkdir(parents=True, exist_ok=True)
  env = env_with_devices(devices_per_process)
  extra = lambda i: []  # noqa: E731
  if num_processes > 1:
    port = free_port()
    extra = lambda i: [f"--coordinator_address=127.0.0.1:{port}",  # noqa: E731
                       f"--num_processes={num_processes}", f"--process_id={i}"]
  procs, logs = [], []
  for i in range(num_processes):
    log = log_dir / f"process{i}.log"
    with log.open("wb") as out:
      procs.append(subprocess.Popen(cmd + extra(i), cwd=REPO, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=new_session))
    logs.append(log)
  return Job(procs, logs)


def logged_steps(workdir: Path) -> list[dict]:
  path = Path(workdir) / "train_metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(job: Job, workdir: Path, step: int, timeout: float = 400) -> None:
  """Blocks until process 0 has logged `step` (training is under way)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if any(row["step"] >= step for row in logged_steps(workdir)):
      return
    if any(p.poll() is not None for p in job.procs):
      raise AssertionError(f"a process exited before step {step}\n{job.tails()}")
    time.sleep(0.2)
  job.kill()
  raise AssertionError(f"step {step} not reached in {timeout} s\n{job.tails()}")
