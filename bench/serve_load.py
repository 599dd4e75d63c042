"""Load on the search service: N concurrent clients on 127.0.0.1 for a bounded time.

    python -m bench.serve_load --index WORKDIR/index [--clients 1,8,32] [--seconds 20] [--with_auth]
    python -m bench.serve_load --index WORKDIR/index --curate [--clients 32] [--changes 3]

For batching on and off (`--nobatching` on the server), starts
`python -m histojax.serve` as its own process, then for each client count
runs that many threads, each sending searches back to back over one
keep-alive connection, first `--warmup_seconds` unmeasured (every padded
batch shape compiles once), then `--seconds` measured. Recorded per run:
latency p50/p95/p99 (ms), queries/s,
errors (any non-200 or failed request), and the server's mean batch size.
Queries are painted 64 px patches (one tile each, the "drop a patch" case)
unless `--images` names files. `--with_auth` runs the server with a token file
and the clients send a reader's `Authorization: Bearer` token.

`--curate`: the server, with tokens, serves a copy of the index (the one given is
never changed) while N reader clients search and a curator adds a probe image
(a painted 128 px image, 4 tiles, not in the gallery) and removes it again,
`--changes` times each, through POST /api/gallery and DELETE
/api/gallery/sources/{id}. Each generation is held until the clients have
answered from it `--min_answers` times, the probe among them. Every answer is
checked against the generation it reports (`consistency_problems`): a known
generation, no gallery row past that generation's rows, the probe found as
itself (top source, every tile's first result) exactly where it is present and
never mentioned where it is not, and no client seeing a generation older than
one it already saw. Recorded: requests, errors, inconsistencies, latency
p50/p95 overall, of searches overlapping a change and of the others, the
generations seen and each change's time (bench/results/serve_curate_load.json).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import PIL.Image
from absl import app, flags

from bench import common
from histojax.service import tokens
from tfds_builders.synthetic_tissue import painter

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
  flags.DEFINE_string("out", None, "JSON path (default bench/results/serve_load.json, or serve_curate_load.json)")
  flags.DEFINE_bool("with_auth", False, "serve with a token file; the clients send a reader's bearer token")
  flags.DEFINE_bool("curate", False, "search while a curator adds and removes a probe image (module doc)")
  flags.DEFINE_integer("changes", 3, "--curate: add/remove pairs")
  flags.DEFINE_integer("min_answers", 200, "--curate: answers from each generation before the next change")


def painted_patches(folder: str, n: int = 16) -> list[str]:
  paths = []
  for i in range(n):
    path = os.path.join(folder, f"patch_{i:02d}.png")
    PIL.Image.fromarray(painter.paint_tissue(i % len(painter.CLASS_NAMES), 1000 + i, 64)).save(path)
    paths.append(path)
  return paths


def multipart(path: str, fields: dict | None = None, data: bytes | None = None) -> tuple[bytes, str]:
  """A multipart body of the file at `path` (or `data` under that name) as field `image`, and text `fields`."""
  boundary = uuid.uuid4().hex
  if data is None:
    with open(path, "rb") as f:
      data = f.read()
  text = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                 for name, value in (fields or {}).items())
  body = (f"{text}--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
          f"filename=\"{os.path.basename(path)}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode() \
      + data + f"\r\n--{boundary}--\r\n".encode()
  return body, f"multipart/form-data; boundary={boundary}"


def bearer(token: str | None) -> dict:
  return {"Authorization": f"Bearer {token}"} if token else {}


def client(port: int, bodies: list, k: int, stop: float, out: list, errors: list, offset: int, token=None):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
  i = offset
  while time.perf_counter() < stop:
    body, ctype = bodies[i % len(bodies)]
    i += 1
    start = time.perf_counter()
    try:
      conn.request("POST", f"/api/search?k={k}", body=body, headers={"Content-Type": ctype, **bearer(token)})
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


def load(port: int, bodies: list, k: int, clients: int, seconds: float, token: str | None = None) -> dict:
  latencies, errors = [], []
  start = time.perf_counter()
  stop = start + seconds
  threads = [threading.Thread(target=client, args=(port, bodies, k, stop, latencies, errors, i, token))
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


def get_json(port: int, path: str, token: str | None = None):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
  conn.request("GET", path, headers=bearer(token))
  data = conn.getresponse().read()
  conn.close()
  return json.loads(data)


def start_server(mode: str, port: int, index: str | None = None, token_file: str | None = None) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "histojax.serve", "--index", index or FLAGS.index, "--port", str(port), f"--{mode}"]
  if FLAGS.workdir:
    cmd += ["--workdir", FLAGS.workdir]
  if token_file:
    cmd += ["--auth_tokens", token_file]
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


# --- Searching while a curator changes the gallery (--curate) ------------------------------

PROBE_ID = "load_probe_case"


@dataclasses.dataclass
class Seen:
  """One search as a client saw it, with what its consistency check needs."""
  client: int
  start: float
  end: float
  probe: bool
  generation: int | None = None
  max_row: int = -1
  mentions: bool = False  # the probe's source id anywhere in the answer
  as_itself: bool = False  # top source the probe, and every tile's first result one of its patches
  error: str | None = None


def probe_image(folder: str) -> str:
  path = os.path.join(folder, "probe.png")
  PIL.Image.fromarray(painter.paint_tissue(3, 5000, 128)).save(path)  # 4 tiles of 64 px, a tumour never seen
  return path


def read_answer(seen: Seen, answer: dict) -> Seen:
  results = [r for tile in answer["tiles"] for r in tile["results"]]
  seen.generation = answer.get("generation")
  seen.max_row = max((r["gallery_row"] for r in results), default=-1)
  sources = [s["source_id"] for s in answer["sources"]]
  seen.mentions = PROBE_ID in sources or any(r["source_id"] == PROBE_ID for r in results)
  seen.as_itself = bool(sources) and sources[0] == PROBE_ID and all(
      tile["results"] and tile["results"][0]["source_id"] == PROBE_ID for tile in answer["tiles"])
  return seen


def checked_client(port: int, token: str, bodies: list, probe: tuple, k: int, stop: threading.Event, out: list,
                   index: int, probe_every: int = 4):
  """Searches back to back until `stop`; every `probe_every`-th query is the probe image."""
  conn, i = http.client.HTTPConnection("127.0.0.1", port, timeout=120), index
  while not stop.is_set():
    is_probe = i % probe_every == 0
    body, ctype = probe if is_probe else bodies[i % len(bodies)]
    i += 1
    seen = Seen(index, time.perf_counter(), 0.0, is_probe)
    try:
      conn.request("POST", f"/api/search?k={k}", body=body, headers={"Content-Type": ctype, **bearer(token)})
      response = conn.getresponse()
      payload = response.read()
      if response.status != 200:
        seen.error = f"{response.status}: {payload[:200]!r}"
      else:
        read_answer(seen, json.loads(payload))
    except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
      seen.error = repr(e)
      conn.close()
      conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    seen.end = time.perf_counter()
    out.append(seen)
  conn.close()


def change(port: int, token: str, op: str, probe_path: str, label: str) -> dict:
  """One add or remove of the probe by the curator; the answer with its start and end."""
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
  start = time.perf_counter()
  if op == "add":
    body, ctype = multipart(probe_path, {"label": label, "source_id": PROBE_ID})
    conn.request("POST", "/api/gallery", body=body, headers={"Content-Type": ctype, **bearer(token)})
  else:
    conn.request("DELETE", f"/api/gallery/sources/{PROBE_ID}", headers=bearer(token))
  response = conn.getresponse()
  payload = json.loads(response.read())
  conn.close()
  if response.status != 200:
    raise RuntimeError(f"the curator's {op} was answered {response.status}: {payload}")
  return {"op": op, "start": start, "end": time.perf_counter(), **payload}


def wait_for(seen: list, generation: int, answers: int, timeout: float, since: int = 0) -> None:
  """Until `answers` searches (a probe among them) were answered from `generation` (among seen[since:])."""
  deadline = time.perf_counter() + timeout
  while time.perf_counter() < deadline:
    got = [s for s in seen[since:] if s.generation == generation]
    if len(got) >= answers and any(s.probe for s in got):
      return
    time.sleep(0.01)
  raise RuntimeError(f"fewer than {answers} searches answered from generation {generation} in {timeout} s")


def consistency_problems(seen: list, first: dict, changes: list) -> list[str]:
  """Each answer against the generation it reports (module doc); `first`: {generation, rows} before any change."""
  rows = {first["generation"]: first["rows"], **{c["generation"]: c["rows_after"] for c in changes}}
  present = {first["generation"]: False, **{c["generation"]: c["op"] == "add" for c in changes}}
  problems, latest = [], {}
  for s in sorted((s for s in seen if s.error is None), key=lambda s: (s.client, s.start)):
    g = s.generation
    if g not in rows:
      problems.append(f"client {s.client}: generation {g} is none the gallery had")
      continue
    if s.max_row >= rows[g]:
      problems.append(f"client {s.client}: gallery row {s.max_row} in generation {g} of {rows[g]} rows")
    if s.probe and present[g] and not s.as_itself:
      problems.append(f"client {s.client}: generation {g} holds the probe, the answer did not find it as itself")
    if not present[g] and s.mentions:
      problems.append(f"client {s.client}: generation {g} lacks the probe, the answer names it")
    if g < latest.get(s.client, g):
      problems.append(f"client {s.client}: generation {g} after {latest[s.client]}")
    latest[s.client] = max(g, latest.get(s.client, g))
  return problems


def curate_load(port: int, reader: str, curator: str, bodies: list, probe_path: str, clients: int = 32,
                pairs: int = 3, min_answers: int = 200, k: int = 10, timeout: float = 300) -> dict:
  """`clients` readers search while the curator adds and removes the probe `pairs` times."""
  info = get_json(port, "/api/info", reader)
  first = {"generation": int((info.get("growth") or {}).get("generation", 0)), "rows": info["rows"]}
  label = painter.CLASS_NAMES[3] if painter.CLASS_NAMES[3] in info["class_names"] else info["class_names"][0]
  with open(probe_path, "rb") as f:
    probe = multipart(probe_path, data=f.read())
  seen, stop, changes = [], threading.Event(), []
  threads = [threading.Thread(target=checked_client, args=(port, reader, bodies, probe, k, stop, seen, i))
             for i in range(clients)]
  start = time.perf_counter()
  for t in threads:
    t.start()
  try:
    wait_for(seen, first["generation"], min_answers, timeout)
    for op in ["add", "remove"] * pairs:
      since = len(seen)
      changes.append(change(port, curator, op, probe_path, label))
      wait_for(seen, changes[-1]["generation"], min_answers, timeout, since)
  finally:
    stop.set()
    for t in threads:
      t.join()
  return summarize(seen, first, changes, time.perf_counter() - start, clients)


def summarize(seen: list, first: dict, changes: list, wall: float, clients: int) -> dict:
  problems = consistency_problems(seen, first, changes)
  ok = [s for s in seen if s.error is None]
  overlaps = lambda s: any(s.start < c["end"] and s.end > c["start"] for c in changes)
  during, outside = [s for s in ok if overlaps(s)], [s for s in ok if not overlaps(s)]
  ms = lambda group, q: round(float(np.percentile([(s.end - s.start) * 1000 for s in group], q)), 1) if group else None
  generations = sorted({s.generation for s in ok})
  return {"clients": clients, "seconds": round(wall, 2), "requests": len(seen), "errors": len(seen) - len(ok),
          "error_examples": [s.error for s in seen if s.error][:3], "inconsistent": len(problems),
          "inconsistent_examples": problems[:5], "queries_per_s": round(len(ok) / wall, 2),
          "p50_ms": ms(ok, 50), "p95_ms": ms(ok, 95),
          "during_changes": {"requests": len(during), "p50_ms": ms(during, 50), "p95_ms": ms(during, 95)},
          "outside_changes": {"requests": len(outside), "p50_ms": ms(outside, 50), "p95_ms": ms(outside, 95)},
          "probe_searches": sum(s.probe for s in ok), "first_generation": first,
          "generations_seen": {str(g): sum(s.generation == g for s in ok) for g in generations},
          "changes": [{"op": c["op"], "generation": c["generation"], "rows_after": c["rows_after"],
                       "retrained": c["retrained"], "seconds": round(c["end"] - c["start"], 3),
                       "searches_overlapping": len(o := [s for s in ok if s.start < c["end"] and s.end > c["start"]]),
                       "their_p95_ms": ms(o, 95)} for c in changes]}


def main_curate(tmp: str, bodies: list) -> None:
  index = os.path.join(tmp, "index")
  shutil.copytree(FLAGS.index, index)  # the index given is never changed
  token_file = os.path.join(tmp, "tokens.json")
  reader, curator = tokens.add(token_file, "load_reader", "reader"), tokens.add(token_file, "load_curator", "curator")
  server = start_server("batching", FLAGS.port, index, token_file)
  try:
    clients = int(FLAGS.clients[-1])
    load(FLAGS.port, bodies, FLAGS.k, clients, FLAGS.warmup_seconds, reader)  # compile the batch shapes first
    probe = probe_image(tmp)
    # The same clients, queries and number of answers with the gallery left alone, just before.
    baseline = curate_load(FLAGS.port, reader, curator, bodies, probe, clients, 0,
                           FLAGS.min_answers * (2 * FLAGS.changes + 1), FLAGS.k)
    result = curate_load(FLAGS.port, reader, curator, bodies, probe, clients, FLAGS.changes, FLAGS.min_answers,
                         FLAGS.k)
    result["baseline_without_changes"] = {key: baseline[key] for key in (
        "seconds", "requests", "errors", "inconsistent", "queries_per_s", "p50_ms", "p95_ms")}
  finally:
    server.terminate()
    server.wait(30)
  print(json.dumps(result), flush=True)
  with open("/proc/loadavg") as f:
    loadavg = f.read().split()[:3]
  common.write("serve_curate_load", {"index": FLAGS.index, "k": FLAGS.k, "load_average_after": loadavg, **result},
               FLAGS.out, quiet=True)


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    paths = FLAGS.images or painted_patches(tmp)
    bodies = [multipart(p) for p in paths]
    if FLAGS.curate:
      main_curate(tmp, bodies)
      return
    token_file = os.path.join(tmp, "tokens.json") if FLAGS.with_auth else None
    token = tokens.add(token_file, "load_reader", "reader") if token_file else None
    clients = [int(c) for c in FLAGS.clients]
    runs = []
    for mode in FLAGS.modes:
      server = start_server(mode, FLAGS.port, token_file=token_file)
      try:
        for n in clients:
          # Unmeasured first: each client count makes batches of its own padded shapes, compiled once.
          load(FLAGS.port, bodies, FLAGS.k, n, FLAGS.warmup_seconds, token)
          result = load(FLAGS.port, bodies, FLAGS.k, n, FLAGS.seconds, token)
          sizes = get_json(FLAGS.port, "/api/info", token)["batching"]["recent_batch_sizes"]
          result["mean_batch_last_20"] = round(float(np.mean(sizes[-20:])), 2) if sizes else None
          runs.append({"mode": mode, **result})
          print(json.dumps(runs[-1]), flush=True)
      finally:
        server.terminate()
        server.wait(30)
  with open("/proc/loadavg") as f:
    loadavg = f.read().split()[:3]
  common.write("serve_load", {"index": FLAGS.index, "k": FLAGS.k, "queries": [os.path.basename(p) for p in paths],
                              "with_auth": FLAGS.with_auth, "load_average_after": loadavg, "runs": runs}, FLAGS.out,
               quiet=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
