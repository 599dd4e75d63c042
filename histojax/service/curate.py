"""The curator's write routes: add a case to the gallery, or remove one, over HTTP.

    POST   /api/gallery                      multipart: image, label, source_id[, new_label=true]
    DELETE /api/gallery/sources/{source_id}

Both run `histojax.indexing.curator`, the code behind `python -m histojax.index add|remove`,
with the model the server already holds: the image is cut as the gallery was, embedded,
probed, retrained when the probe says so, and the next generation is swapped in atomically.
The work runs on a thread of its own ("histojax-curator"), never the engine's: searches keep
answering from the generation in memory until the swap, then the engine re-reads the index
before answering anything else, so the `generation` of the answer is what the next search
reports.

One write at a time: while one holds the index's lock (this server's, or a CLI's in another
process) the next is answered 409 at once (`reason: busy`, Retry-After), not queued.

Answers: 200 with `source_id`, `rows_added` or `rows_removed`, `rows_after`, the new
`generation` and `retrained` (whether the searcher was retrained); an add also `label` and
`new_label` (whether the label became a new class). Refused:
- 400: a field missing or malformed (source ids: letters, digits, `.`, `_`, `-`, starting with
  a letter or digit, at most 128), an upload that is not a readable image, a whole-slide file;
- 404: removing a source id that no row has;
- 409: another write holds the lock; the source id is already in the gallery. The same
  request succeeds once the gallery changes (the lock is released, the id removed): a conflict
  with its state, not a fault of the request. Also 409: the index on disk was rebuilt for
  another model than the server's;
- 413: over --max_upload_mb, or over the pixel limit;
- 422: a label that is not one of the index's classes without `new_label=true`, an image
  smaller than the model input or without a tile of tissue (the request cannot be carried out
  whatever the gallery holds);
- 500: the write failed (a full disk...): the previous generation is intact and still served.

Whole-slide files are not taken here (nor anywhere yet): grow the gallery with the image files
cut from them, from the page or with `python -m histojax.index add`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import sys
import threading

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from histojax import fileio
from histojax.data import images
from histojax.indexing import curator, store
from histojax.service import audit, forms
from histojax.service.forms import HTTPError

SOURCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_LABEL = 64
TRUE, FALSE = ("true", "1", "on", "yes"), ("false", "0", "off", "no", "")
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".czi", ".isyntax")
BUSY_RETRY_S = 2


def busy() -> HTTPError:
  return HTTPError(409, "another change to the gallery is being written; try again when it is done", reason="busy",
                   headers={"Retry-After": str(BUSY_RETRY_S)})


def add_fields(upload: forms.Upload) -> tuple[str, str, bool]:
  """(source id, label, new_label) of an addition's form, or 400 naming the field."""
  fields = upload.fields
  missing = [name for name in ("label", "source_id") if not fields.get(name, "").strip()]
  if missing:
    raise HTTPError(400, f"form field(s) {', '.join(missing)} missing: an addition sends image, label and "
                    "source_id (and new_label=true for a label the index does not have yet)")
  source_id, label = fields["source_id"].strip(), fields["label"].strip()
  if not SOURCE_ID.fullmatch(source_id):
    raise HTTPError(400, f"source_id {source_id[:140]!r} is not a safe id: letters, digits, '.', '_' and '-', "
                    "starting with a letter or digit, at most 128 characters")
  if len(label) > MAX_LABEL or not label.isprintable():
    raise HTTPError(400, f"label must be printable text of at most {MAX_LABEL} characters")
  new = fields.get("new_label", "false").strip().lower()
  if new not in TRUE + FALSE:
    raise HTTPError(400, f"new_label must be true or false, got {fields['new_label'][:20]!r}")
  return source_id, label, new in TRUE


class Curation:
  """The two routes around an open query engine and its index folder; `reload` is a
  coroutine re-reading the index on the engine's thread and giving the generation it serves."""

  def __init__(self, engine, index_dir: str, reload, max_upload_bytes: int, max_pixels: int):
    self.engine, self.index_dir, self.reload = engine, index_dir, reload
    self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
    # Taken without waiting before a write is handed to the one curator thread, so a second
    # write is told 409 at once instead of queueing behind the first (the folder's lock, also
    # taken without waiting, covers writers in other processes).
    self._writing = threading.Lock()
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="histojax-curator")

  def routes(self, guard) -> list[Route]:
    return [Route("/api/gallery", guard("add", self.add, upload=True), methods=["POST"]),
            Route("/api/gallery/sources/{source_id}", guard("remove", self.remove), methods=["DELETE"])]

  def close(self) -> None:
    self._pool.shutdown(wait=True)

  async def add(self, request: Request) -> JSONResponse:
    try:
      upload = await forms.read_form(request, self.max_upload_bytes, ("label", "source_id", "new_label"))
      source_id, label, new_label = add_fields(upload)
      audit.note(request, source_ids=[source_id], label=label, image=audit.query_record(upload.data))
      image = await self._decode(upload)
      summary = await self._write(source_id, curator.add_upload, self.engine, self.index_dir, source_id, image,
                                  label, new_label)
    except HTTPError as e:
      return forms.error_response(e)
    await self.reload()
    answer = {"source_id": source_id, "label": label, "new_label": summary["new_class"],
              "rows_added": summary["rows_added"], "rows_after": summary["rows_after"],
              "generation": summary["generation"], "retrained": summary["rebalanced"],
              "probe_recall": summary["probe_recall"]}
    audit.note(request, generation=answer["generation"], rows_added=answer["rows_added"],
               retrained=answer["retrained"], new_label=answer["new_label"])
    return JSONResponse(answer)

  async def remove(self, request: Request) -> JSONResponse:
    source_id = request.path_params["source_id"]
    try:
      if len(source_id) > 256 or not source_id.isprintable():
        raise HTTPError(400, "a source id is printable text of at most 256 characters")
      audit.note(request, source_ids=[source_id])
      summary = await self._write(source_id, curator.remove, self.index_dir, [source_id], False, False)
    except HTTPError as e:
      return forms.error_response(e)
    await self.reload()
    answer = {"source_id": source_id, "rows_removed": summary["rows_removed"], "rows_after": summary["rows_after"],
              "generation": summary["generation"], "retrained": summary["rebalanced"]}
    audit.note(request, generation=answer["generation"], rows_removed=answer["rows_removed"],
               retrained=answer["retrained"])
    return JSONResponse(answer)

  async def _decode(self, upload: forms.Upload):
    if upload.name.lower().endswith(SLIDE_SUFFIXES):
      raise HTTPError(400, "whole-slide files are not added here: add image files (tiles or photos) cut from the "
                      "slide, from the page or with `python -m histojax.index add`")
    try:
      return await run_in_threadpool(images.read_image, upload.data, max_pixels=self.max_pixels, name=upload.name)
    except images.ImageTooLargeError as e:
      raise HTTPError(413, str(e)) from e
    except images.ImageError as e:
      raise HTTPError(400, str(e)) from e

  async def _write(self, source: str, fn, *args) -> dict:
    """`fn(*args)` (a change of `source`) on the curator thread; the curator's refusals as answers."""
    if not self._writing.acquire(blocking=False):
      raise busy()
    try:
      future = asyncio.get_running_loop().run_in_executor(self._pool, self._locked, fn, args)
    except BaseException:
      self._writing.release()
      raise
    try:
      return await future
    except fileio.FolderBusy:
      raise busy() from None
    except curator.UnknownClass as e:
      raise HTTPError(422, str(e), reason="unknown_label") from None
    except curator.SourceExists:
      raise HTTPError(409, f"source id {source!r} is already in the gallery: remove it first (DELETE "
                      f"/api/gallery/sources/{source}) or choose another id", reason="exists") from None
    except curator.UnknownSource:
      raise HTTPError(404, f"no gallery row has the source id {source!r}", reason="unknown_source") from None
    except curator.UnusableImage as e:
      raise HTTPError(422, str(e), reason="no_tile") from None
    except store.ManifestMismatch as e:
      print(f"histojax.serve: {e}", file=sys.stderr, flush=True)
      raise HTTPError(409, "the index on disk was rebuilt for another model than the one this server holds: "
                      "restart the server", reason="model_mismatch") from None
    except OSError as e:  # the swap never happened: the previous generation is what is on disk
      print(f"histojax.serve: writing the gallery's next generation failed: {type(e).__name__}: {e}",
            file=sys.stderr, flush=True)
      raise HTTPError(500, "the gallery could not be written (the server's log says why); the previous generation "
                      "is intact and still served", reason="write_failed") from None

  def _locked(self, fn, args):
    try:
      return fn(*args)
    finally:
      self._writing.release()
