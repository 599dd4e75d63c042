"""Load on the search service: N concurrent clients on 127.0.0.1 for a bounded time.

    python -m bench.serve_load --index WORKDIR/index [--clients 1,8,32] [--seconds 20]

For batching on and off (`--nobatching` on the server), starts
`python -m histojax.serve` as its own process, then for each client count
runs that many threads, each sending searches back to back over one
keep-alive connection, first `--warmup_seconds` unmeasured (every padded
batch shape compiles once), then `--seconds` measured. Recorded per run:
latency p50/p95/p99 (ms), queries/s,
errors (any non-200 or failed request), and the server's mean batch size.
Queries are painted 64 px patches (one tile each, the "drop a patch" case)
unless `--images` names files.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
from absl import app, flags

from bench import common

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("index", None, "index folder to serve", required=True)
  flags.DEFINE_string("workdir", None, "query model workdir (default: the manifest's)")
  flags.DEFINE_list("clients", ["1", "8", "32"], "concurrent client counts")
  flags.DEFINE_float("seconds", 20.0, "measured seconds per client count")
  flags.DEFINE_float("warmup_seconds", 6.0, "unmeasured load before each measured run")
  flags.DEFINE_list("images", [], "query image files (default: 16 painted 64 px patches)")
  flags.DEFINE_integer("k", 10, "neighbours per tile")
  flags.DEFINE_integer("port", 8791, "port for the server under test")
  flags.DEFINE_list("modes", ["batching", "nobatching"], "server modes to measure")
  flags.DEFINE_string("out", None, "JSON path (default bench/results/serve_load.json)")


def painted_patches(folder: str, n: int = 16) -> list[str]:
  import PIL.Image  # noqa: PLC0415

  from tfds_builders.synthetic_tissue import painter  # noqa: PLC0415
  paths = []
  for i in range(n):
    path = os.path.join(folder, f"patch_{i:02d}.png")
    PIL.Image.fromarray(painter.paint_tissue(i % len(painter.CLASS_NAMES), 1000 + i, 64)).save(path)
    paths.append(path)
  return paths


def multipart(path: str) -> tuple[bytes, str]:
  boundary = uuid.uuid4().hex
  with open(path, "rb") as f:
    data = f.read()
  body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{os.path.basename(path)}\"\r\n"
          f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
  return body, f"multipart/form-data; boundary={boundary}"


def client(port: int, bodies: list, k: int, stop: float, out: list, errors: list, offset: int):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
  i = offset
  while time.perf_counter() < stop:
    body, ctype = bodies[i % len(bodies)]
    i += 1
    start = time.perf_counter()
    try:
      conn.request("POST", f"/api/search?k={k}", body=body, headers={"Content-Type": ctype})
      response = conn.getresponse()
      payload = response.read()
      if response.status != 200 or b'"tiles"' not in payload:
        errors.append(f"{response.status}: {payload[:200]!r}")
        continue
    except (OSError, http.client.HTTPException) as e:
      errors.append(repr(e))
      conn.close()
      conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
      continue
    out.append(time.perf_counter() - start)
  conn.close()


def load(port: int, bodies: list, k: int, clients: int, seconds: float) -> dict:
  latencies, errors = [], []
  start = time.perf_counter()
  stop = start + seconds
  threads = [threading.Thread(target=client, args=(port, bodies, k, stop, latencies, errors, i))
             for i in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - start
  ms = np.array(latencies) * 1000
  pct = lambda q: round(float(np.percentile(ms, q)), 1) if len(ms) else None
  return {"clients": clients, "seconds": round(wall, 2), "queries": len(latencies), "errors": len(errors),
          "error_examples": errors[:3], "queries_per_s": round(len(latencies) / wall, 2),
          "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99)}


def get_json(port: int, path: str):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
  conn.request("GET", path)
  data = conn.getresponse().read()
  conn.close()
  return json.loads(data)


def start_server(mode: str, port: int) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "histojax.serve", "--index", FLAGS.index, "--port", str(port), f"--{mode}"]
  if FLAGS.workdir:
    cmd += ["--workdir", FLAGS.workdir]
  server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline:
    if server.poll() is not None:
      raise RuntimeError(f"the server exited: {server.stderr.read()[-2000:]}")
    try:
      get_json(port, "/healthz")
      return server
    except OSError:
      time.sleep(0.5)
  server.kill()
  raise RuntimeError("the server did not answer /healthz within 300 s")


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    paths = FLAGS.images or painted_patches(tmp)
    bodies = [multipart(p) for p in paths]
    clients = [int(c) for c in FLAGS.clients]
    runs = []
    for mode in FLAGS.modes:
      server = start_server(mode, FLAGS.port)
      try:
        for n in clients:
          # Unmeasured first: each client count makes batches of its own padded shapes, compiled once.
          load(FLAGS.port, bodies, FLAGS.k, n, FLAGS.warmup_seconds)
          result = load(FLAGS.port, bodies, FLAGS.k, n, FLAGS.seconds)
          sizes = get_json(FLAGS.port, "/api/info")["batching"]["recent_batch_sizes"]
          result["mean_batch_last_20"] = round(float(np.mean(sizes[-20:])), 2) if sizes else None
          runs.append({"mode": mode, **result})
          print(json.dumps(runs[-1]), flush=True)
      finally:
        server.terminate()
        server.wait(30)
  with open("/proc/loadavg") as f:
    loadavg = f.read().split()[:3]
  common.write("serve_load", {"index": FLAGS.index, "k": FLAGS.k, "queries": [os.path.basename(p) for p in paths],
                              "load_average_after": loadavg, "runs": runs}, FLAGS.out, quiet=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
