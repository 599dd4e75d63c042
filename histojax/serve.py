"""The search service and its page: `python -m histojax.serve --index DIR`.

    python -m histojax.serve --index WORKDIR/index [--host 127.0.0.1] [--port 8080]

One process (Starlette on uvicorn) loads the index and its query model once
(`query.QueryEngine`) and serves:
- `POST /api/search?k=10`, multipart field `image`: the `search --json` object
  for that image (tiles, neighbours, vote, top source images);
- `GET /api/gallery/{row}/image[?generation=N]`: the gallery patch of a row as
  PNG, read from the TFDS split the index was built from (or, for a row added
  later, from the index itself); 409 when N (the generation of the search
  that named the row; the page sends it) is not the one served;
- `GET /api/slides/{id}/info|thumbnail|tiles/...`: a gallery slide's facts, thumbnail and
  Deep Zoom tiles for the page's viewer (histojax.service.viewer; `--slides_root`);
- `GET /api/info` (manifest summary), `GET /healthz`, and `GET /` (the page);
- `POST /api/login`, `POST /api/logout`, `GET /api/session`, `GET /api/audit`
  (histojax.service.auth);
- `POST /api/gallery` (multipart image, label, source_id[, new_label]) and
  `DELETE /api/gallery/sources/{source_id}`: a curator adds or removes a case,
  through the CLI's curator code on a thread of its own (histojax.service.curate).

Who may call what (histojax.service, docs/serving-a-lab.md): every API route
goes through `Gate.guard` with the action it needs (search, picture, info:
readers; reload, audit, add and remove: curators). Without
`--auth_tokens` or `--trusted_proxy` the service is read-only, open to whoever
reaches it, and refuses a non-loopback --host unless `--insecure_no_auth`.
Every search answer carries the index `generation` it was answered from.

    python -m histojax.serve token add --name NAME --role reader|curator --file FILE

Concurrent searches are batched: decoded images wait in an asyncio queue;
the worker takes what queued while the previous batch ran and, while other
requests are still being received or decoded, waits for them up to
`--batch_wait_ms` (never for requests not yet sent, so a lone client waits
for nothing), at most `--max_batch`; the batch is answered by ONE
`answer_batch` call (one padded device call) in the one worker thread that
owns the engine. `--nobatching` answers one
request at a time (the load benchmark's baseline).

A changed index (`index add|remove`) is picked up without a restart: before
a batch, at most once a second, the worker asks the engine to
`reload_if_changed`; `POST /api/reload` (curators) and the server's own
additions and removals do it at once. Searches answer from the generation in
memory until then (a reload reads every file of one generation, or keeps the
previous one).

Bad input gets a 4xx with a message and the server goes on: 413 over
`--max_upload_mb` (64) or over the pixel limit, 400 for an empty, truncated
or non-image upload, 422 for an image smaller than the model input, 400/404
for a gallery row that is not a number or out of range; 401/403 for a
missing or refused credential, 429 past a per-user limit. Uploads are only
ever decoded as images (never unpickled). Binds 127.0.0.1 unless --host.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import os
import re
import sys
import time

import numpy as np
import PIL.Image
import uvicorn
from absl import app as absl_app
from absl import flags, logging
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from histojax import indexing, query, service
from histojax.data import images
from histojax.service import audit, auth, curate, headers, viewer
from histojax.service.forms import HTTPError, error_response, read_upload

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MiB = 1 << 20


def generation(manifest: dict) -> int:
  """How many times the index was grown since it was built (its manifest's growth record)."""
  return int((manifest.get("growth") or {}).get("generation", 0))


# --- Dynamic batching ----------------------------------------------------------------

class Batcher:
  """Queues searches and answers them in batches on one worker thread (the engine's owner)."""

  def __init__(self, engine, wait_s: float = 0.005, max_batch: int = 16, enabled: bool = True,
               on_reload=None, reload_every_s: float = 1.0):
    self.engine, self.wait_s, self.max_batch, self.enabled = engine, wait_s, max_batch, enabled
    self.on_reload, self.reload_every_s, self._checked = on_reload, reload_every_s, time.monotonic()
    self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="histojax-engine")
    self.batches: list[int] = []  # size of every batch answered (recent), for /api/info and tests
    self.arriving = 0  # searches being received or decoded, not yet queued (see `_collect`)
    self._queue: asyncio.Queue | None = None
    self._task = None

  async def start(self):
    self._queue = asyncio.Queue()
    self._task = asyncio.create_task(self._loop())

  async def stop(self):
    if self._task:
      self._task.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await self._task
    self.worker.shutdown(wait=True)

  async def search(self, name: str, image: np.ndarray, k: int) -> dict:
    future = asyncio.get_running_loop().create_future()
    await self._queue.put((name, image, k, future))
    return await future

  async def run(self, fn, *args):
    """`fn(*args)` on the engine's thread, between batches."""
    return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

  async def _collect(self) -> list:
    batch = [await self._queue.get()]
    if not self.enabled:
      return batch
    loop = asyncio.get_running_loop()
    deadline = loop.time() + self.wait_s
    while len(batch) < self.max_batch:
      if not self._queue.empty():  # arrived while the previous batch ran: no wait
        batch.append(self._queue.get_nowait())
        continue
      timeout = deadline - loop.time()
      # Wait only for requests already received (their upload or decode still running): a
      # lone client is answered at once, not after the wait bound.
      if timeout <= 0 or not self.arriving:
        break
      try:
        batch.append(await asyncio.wait_for(self._queue.get(), timeout))
      except TimeoutError:
        break
    return batch

  async def _loop(self):
    while True:
      batch = await self._collect()
      try:
        answers = await self.run(self._answer, batch)
      except Exception as e:  # noqa: BLE001  (every waiting request learns of it)
        for *_, future in batch:
          if not future.done():
            future.set_exception(e)
        continue
      for (*_, future), answer in zip(batch, answers):
        if not future.done():
          future.set_result(answer)

  def _answer(self, batch: list) -> list[dict]:
    self.maybe_reload()
    # Read on the engine's own thread, between reloads: the index every answer of this batch used.
    answered_from = generation(self.engine.manifest)
    out = [None] * len(batch)
    for k in sorted({item[2] for item in batch}):  # one call per k (the vote depends on it)
      members = [i for i, item in enumerate(batch) if item[2] == k]
      for i, answer in zip(members, self.engine.answer_batch([batch[i][:2] for i in members], k)):
        out[i] = {**answer, "generation": answered_from}
    self.batches = (self.batches + [len(batch)])[-1000:]
    return out

  def maybe_reload(self, force: bool = False) -> bool:
    """Re-reads the index if it changed on disk; a failed read keeps the index in use."""
    if not force and time.monotonic() - self._checked < self.reload_every_s:
      return False
    self._checked = time.monotonic()
    try:
      changed = self.engine.reload_if_changed()
    except (OSError, ValueError) as e:  # mid-swap or broken on disk: keep serving what we have
      print(f"histojax.serve: index reload failed, still serving the previous one: {e}", flush=True)
      return False
    if changed and self.on_reload:
      self.on_reload()
    return changed


# --- Gallery pictures ------------------------------------------------------------------

class Gallery:
  """Picture of every gallery row: from the TFDS split the index was built from, or from
  the index folder for rows added later (`index add`, the curator routes).

  Rows are numbered anew by every removal, so a picture asked for with the `generation` of
  the search that named its row is refused (409) once the gallery has moved on, rather than
  showing another case's tissue under that row's label."""

  def __init__(self, index_dir: str, manifest: dict, data_dir: str):
    self.index_dir, self.manifest, self.data_dir = index_dir, manifest, data_dir
    self.source, self.error = None, None
    self.refresh(generation_now=generation(manifest))
    try:
      # TFDS (and what it pulls in) is imported only to show a dataset's pictures: the
      # search path never needs it.
      from histojax.data import sources  # noqa: PLC0415
      self.source = sources.open_split(manifest["dataset"], manifest["split"], data_dir)
    except Exception as e:  # noqa: BLE001  (any reason the dataset is unreachable: the page says it)
      self.error = (f"gallery dataset {manifest.get('dataset')!r} (split {manifest.get('split')!r}, data_dir "
                    f"{data_dir or 'TFDS default'}) cannot be opened: {e}")

  def refresh(self, rows: dict | None = None, generation_now: int | None = None):
    """The rows of the index now served and their generation (else rows.npz and the manifest read again)."""
    if rows is None:
      rows, generation_now = indexing.load_rows(self.index_dir), generation(indexing.read_manifest(self.index_dir))
    self.current = (rows, generation_now)  # one assignment: a picture reads both of one generation

  @property
  def rows(self) -> dict:
    return self.current[0]

  def png(self, row: int, wanted: int | None = None) -> bytes:
    rows, served = self.current
    if wanted is not None and wanted != served:
      raise HTTPError(409, f"the gallery changed since that search (generation {wanted}, now {served}) and its rows "
                      "were numbered anew: search again", reason="generation")
    if not 0 <= row < len(rows["label"]):
      raise HTTPError(404, f"gallery row {row} is out of range: the index has {len(rows['label'])} rows "
                      f"(0..{len(rows['label']) - 1})")
    try:
      added = indexing.added_patch_png(self.index_dir, rows, row)
    except FileNotFoundError:  # its batch went with a removal swapped in a moment ago; rows not re-read yet
      raise HTTPError(409, "the gallery changed a moment ago: search again", reason="generation") from None
    if added is not None:
      return added
    if self.source is None:
      raise HTTPError(503, self.error)
    data = self.source[int(rows["dataset_row"][row])]["image"]
    if isinstance(data, bytes) and data.startswith(b"\x89PNG"):
      return data
    array = data if isinstance(data, np.ndarray) else np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# --- Requests ----------------------------------------------------------------------------

def parse_k(request: Request, num_rows: int) -> int:
  raw = request.query_params.get("k", "10")
  if not re.fullmatch(r"[0-9]{1,6}", raw) or not 1 <= int(raw) <= 1000:
    raise HTTPError(400, f"k must be an integer from 1 to 1000, got {raw!r}")
  return min(int(raw), num_rows)


def build_app(engine, index_dir: str, data_dir: str = "", max_upload_bytes: int = 64 * MiB,
              max_pixels: int | None = None, batching: bool = True, batch_wait_ms: float = 5.0,
              max_batch: int = 16, gate: auth.Gate | None = None, cors_origins=(),
              loopback_hosts_only: bool = False, slides_root: str | None = None) -> Starlette:
  """The ASGI app around an open `QueryEngine`; `gate` says who may do what (default: no
  authentication, read-only); `loopback_hosts_only` refuses a Host that does not name loopback."""
  max_pixels = max_pixels or images.DEFAULT_MAX_PIXELS["serve"]
  gate = gate or auth.Gate()
  gallery = Gallery(index_dir, engine.manifest, data_dir)
  # The pictures follow the rows the engine answers from (read with its searcher, one generation).
  batcher = Batcher(engine, batch_wait_ms / 1000, max_batch, batching, on_reload=lambda: gallery.refresh(engine.rows, generation(engine.manifest)))

  async def reload_now() -> int:
    await batcher.run(batcher.maybe_reload, True)
    return generation(engine.manifest)
  curation = curate.Curation(engine, index_dir, reload_now, max_upload_bytes, max_pixels)

  async def search(request: Request):
    try:
      batcher.arriving += 1  # one event loop: no lock needed
      try:
        k = parse_k(request, engine.num_rows)
        name, data = await read_upload(request, max_upload_bytes)
        audit.note(request, query=audit.query_record(data), k=k)
        image = await run_in_threadpool(images.read_image, data, max_pixels=max_pixels, name=name)
      except images.ImageTooLargeError as e:
        raise HTTPError(413, str(e)) from e
      except images.ImageError as e:
        raise HTTPError(400, str(e)) from e
      finally:
        batcher.arriving -= 1
      answer = await batcher.search(name, image, k)
    except HTTPError as e:
      return error_response(e)
    audit.note(request, generation=answer.get("generation"), top=audit.top_answer(answer))
    if "error" in answer:  # the image could not be cut (smaller than the model input)
      return JSONResponse({**answer, "status": 422}, status_code=422)
    return JSONResponse(answer)

  async def gallery_image(request: Request):
    raw, wanted = request.path_params["row"], request.query_params.get("generation")
    if not re.fullmatch(r"[0-9]{1,12}", raw):
      return error_response(HTTPError(400, f"gallery row must be a non-negative integer, got {raw!r}"))
    if wanted is not None and not re.fullmatch(r"[0-9]{1,12}", wanted):
      return error_response(HTTPError(400, f"generation must be a non-negative integer, got {wanted!r}"))
    audit.note(request, row=int(raw))
    try:
      data = await run_in_threadpool(gallery.png, int(raw), None if wanted is None else int(wanted))
    except HTTPError as e:
      return error_response(e)
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})

  async def gallery_other(request: Request):
    return error_response(HTTPError(400, f"no such gallery resource {request.path_params['rest']!r}: use "
                                    "/api/gallery/<row>/image with a row number"))

  async def info(request: Request):
    m = engine.manifest
    return JSONResponse({
        "model": m.get("model"), "checkpoint": m.get("checkpoint"), "dataset": m.get("dataset"),
        "split": m.get("split"), "class_names": engine.class_names, "rows": engine.num_rows,
        "tiling": engine.tiling, "image_size": engine.image_size, "mode": m.get("mode"), "dim": m.get("dim"),
        "growth": m.get("growth"), "gallery_images": {"available": gallery.source is not None,
                                                      "reason": gallery.error},
        "limits": {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels},
        "batching": {"enabled": batching, "wait_ms": batch_wait_ms, "max_batch": max_batch,
                     "recent_batch_sizes": batcher.batches[-20:]}})

  async def reload(request: Request):
    changed = await batcher.run(batcher.maybe_reload, True)
    audit.note(request, reloaded=bool(changed), generation=generation(engine.manifest))
    return JSONResponse({"reloaded": bool(changed), "rows": engine.num_rows, "generation": generation(engine.manifest)})

  async def healthz(request: Request):
    return JSONResponse({"status": "ok", "rows": engine.num_rows})

  async def page(request: Request):
    return FileResponse(os.path.join(STATIC, "index.html"), headers={"Cache-Control": "no-store"})

  @contextlib.asynccontextmanager
  async def lifespan(app):
    await batcher.start()
    yield
    await batcher.stop()
    curation.close()
    gate.audit.close()

  guard = gate.guard  # each API route with the action it needs (histojax.service.tokens.ALLOWED)
  app = Starlette(routes=[
      Route("/", page), Route("/healthz", healthz), Route("/api/info", guard("info", info)),
      Route("/api/search", guard("search", search, upload=True), methods=["POST"]),
      Route("/api/reload", guard("reload", reload), methods=["POST"]),
      *curation.routes(guard),  # POST /api/gallery, DELETE /api/gallery/sources/{id}: before the catch-all
      Route("/api/gallery/{row}/image", guard("picture", gallery_image)),
      Route("/api/gallery/{rest:path}", guard("picture", gallery_other)),
      *viewer.routes(engine, guard, slides_root),  # gallery slides' thumbnails and Deep Zoom tiles
      *gate.routes(),
      Mount("/static", StaticFiles(directory=STATIC)),
  ], lifespan=lifespan, middleware=headers.middleware(cors_origins, loopback_hosts_only))
  app.state.batcher, app.state.gallery, app.state.gate, app.state.curation = batcher, gallery, gate, curation
  return app


# --- CLI ------------------------------------------------------------------------------------

def dataset_dir(index_dir: str, manifest: dict, workdir: str | None) -> str:
  """The TFDS data_dir of the model's training config ('' = TFDS's default)."""
  try:
    found = query.model_workdir(index_dir, manifest, workdir)
    with open(os.path.join(found, "config.json")) as f:
      return json.load(f).get("dataset", {}).get("data_dir", "") or ""
  except (FileNotFoundError, KeyError, ValueError):
    return ""


def define_flags() -> None:
  flags.DEFINE_string("index", None, "index folder written by evaluate (<workdir>/index)", required=True)
  flags.DEFINE_string("host", "127.0.0.1", "address to bind; 0.0.0.0 exposes the service to the network")
  flags.DEFINE_integer("port", 8080, "port to listen on")
  flags.DEFINE_string("workdir", None, "query model workdir; default the one named in the index manifest")
  flags.DEFINE_integer("step", None, "query model step; default the manifest's")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir of the gallery dataset; default the model config's")
  flags.DEFINE_float("max_upload_mb", 64.0, "largest upload accepted (MiB); larger ones get 413")
  flags.DEFINE_integer("max_pixels", None, "largest image accepted (pixels); default "
                       "histojax.data.images.DEFAULT_MAX_PIXELS['serve']")
  flags.DEFINE_bool("batching", True, "batch concurrent searches into one device call (--nobatching: one by one)")
  flags.DEFINE_float("batch_wait_ms", 5.0, "how long the first search of a batch waits for others")
  flags.DEFINE_integer("max_batch", 16, "most searches in one batch")
  flags.DEFINE_string("slides_root", None, "folder holding the gallery's slides, replacing the root the index recorded")
  service.define_flags()


def run(index_dir: str, host: str = "127.0.0.1", port: int = 8080, workdir: str | None = None,
        step: int | None = None, data_dir: str | None = None, gate: auth.Gate | None = None,
        insecure_no_auth: bool = False, **options) -> None:
  gate = gate or auth.Gate()
  warning = auth.check_bind(host, gate.enabled, insecure_no_auth)  # before the model loads: fail fast
  if warning:
    print(warning, file=sys.stderr, flush=True)
  if gate.tokens is not None and not gate.tokens.active():
    print(f"histojax.serve: {gate.tokens.path} holds no active token: nobody can sign in with one",
          file=sys.stderr, flush=True)
  if gate.enabled and not gate.audit.enabled:
    print("histojax.serve: no --audit_log: searches and changes are not recorded", file=sys.stderr, flush=True)
  engine = query.QueryEngine.open(index_dir, workdir, step)
  if data_dir is None:
    data_dir = dataset_dir(index_dir, engine.manifest, workdir)
  # Open to whoever reaches loopback: answer only to loopback names (no DNS rebinding).
  loopback_only = not gate.enabled and not insecure_no_auth
  app = build_app(engine, index_dir, data_dir, gate=gate, loopback_hosts_only=loopback_only, **options)
  print(f"histojax.serve: {engine.num_rows} gallery rows; http://{host}:{port}/", flush=True)
  uvicorn.run(app, **uvicorn_options(host, port))


def uvicorn_options(host: str, port: int) -> dict:
  # The trusted proxy's headers are read by the Gate, which must see the real peer address to
  # decide whether to believe them; uvicorn's own X-Forwarded-For rewriting (on by default,
  # believing 127.0.0.1) would replace that address first, so it stays off, proxy or not.
  return {"host": host, "port": port, "log_level": "warning", "proxy_headers": False, "server_header": False}


def main(argv) -> None:
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS are chatty at INFO
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  try:
    gate = service.gate_from_flags(f)
  except ValueError as e:  # TokenFileError included: the flag or file at fault
    raise SystemExit(f"histojax.serve: {e}") from None
  run(f.index, f.host, f.port, f.workdir, f.step, f.data_dir, gate=gate, insecure_no_auth=f.insecure_no_auth,
      max_upload_bytes=int(f.max_upload_mb * MiB), max_pixels=f.max_pixels, batching=f.batching,
      batch_wait_ms=f.batch_wait_ms, max_batch=f.max_batch, cors_origins=f.cors_origins, slides_root=f.slides_root)


if __name__ == "__main__":
  if sys.argv[1:2] == ["token"]:  # python -m histojax.serve token add|list|revoke
    service.tokens.define_flags()
    absl_app.run(service.tokens.main)
  else:
    define_flags()
    absl_app.run(main)
