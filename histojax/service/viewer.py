"""The slide viewer's routes: a gallery slide's facts, thumbnail and Deep Zoom tiles, read from
the slide's own file through OpenSlide (`openslide.deepzoom.DeepZoomGenerator`).

    GET /api/slides/{slide_id}/info                           level-0 size, mpp, label, case, Deep Zoom layout
    GET /api/slides/{slide_id}/thumbnail?size=512             JPEG, the longer side `size` px (64..1024)
    GET /api/slides/{slide_id}/tiles/{level}/{col}_{row}.jpeg a Deep Zoom tile (OpenSeadragon's tile source)

Where a gallery slide's file is: the index manifest's `slides` record (written by the
`slides` builder and by `index add --slides`) maps each slide id to a path relative to
its `root`, or an absolute one. `serve --slides_root DIR` replaces the root, so a
gallery's slides can be moved or mounted elsewhere as a whole. A slide id is only ever
looked up in that record, never joined to a path, and a relative path that would leave
the root is refused: a request cannot name a file. Unknown slides, missing files, levels,
columns and rows outside the pyramid get 404; malformed ones 400; the server goes on.

The Deep Zoom image is the slide's whole level-0 frame (`limit_bounds=False`), so its
pixel coordinates are the level-0 coordinates of the search answers' regions. Open slides
are kept in a small LRU (`MAX_OPEN`); one in use is closed only once nobody reads it.
Every route goes through the Gate as a `picture` (readers may see tissue; with
authentication on, nobody without a credential).
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import re
import threading

import numpy as np
import openslide
from openslide import deepzoom
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from histojax import slides

TILE_SIZE, OVERLAP, FORMAT, QUALITY = 254, 1, "jpeg", 80  # OpenSeadragon's usual Deep Zoom layout
MAX_OPEN = 8  # slides held open (an OpenSlide handle keeps a tile cache of its own)
THUMBNAIL_PX = (64, 1024)
NUMBER = re.compile(r"[0-9]{1,7}")
MAX_ID = 512


class ViewerError(Exception):
  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


class SlideFiles:
  """Slide id -> its file, from the index manifest's `slides` record (`slides_root` replacing its root)."""

  def __init__(self, engine, slides_root: str | None = None):
    self.engine, self.slides_root = engine, slides_root

  def path(self, slide_id: str) -> str:
    record = self.engine.manifest.get("slides") or {}
    relative = (record.get("files") or {}).get(slide_id)
    if not isinstance(relative, str) or not relative:
      raise ViewerError(404, f"no gallery slide {slide_id!r} (the index records no file for it)")
    root = os.path.abspath(self.slides_root or record.get("root") or ".")
    path = os.path.normpath(relative if os.path.isabs(relative) else os.path.join(root, relative))
    if not os.path.isabs(relative) and os.path.commonpath([root, path]) != root:
      raise ViewerError(404, f"gallery slide {slide_id!r}: its recorded path leaves the slides root; refused")
    if not os.path.exists(path):
      where = "--slides_root" if self.slides_root else "the index's recorded slides root (or serve --slides_root)"
      raise ViewerError(404, f"gallery slide {slide_id!r}: its file {path} is not there; check {where}")
    return path

  def facts(self, slide_id: str) -> dict:
    """The label and case the gallery rows record for a slide."""
    rows = self.engine.rows
    mine = np.flatnonzero(rows["source_id"] == slide_id)
    if not len(mine):
      return {"label": None, "case_id": None}
    row = int(mine[0])
    names = self.engine.class_names
    label = int(rows["label"][row])
    return {"label": names[label] if 0 <= label < len(names) else str(label), "label_id": label,
            "case_id": str(rows["case_id"][row]) if "case_id" in rows else None}


class OpenSlides:
  """A small LRU of open slides and their Deep Zoom generators; thread-safe."""

  def __init__(self, capacity: int = MAX_OPEN):
    self.capacity = capacity
    self._open: collections.OrderedDict = collections.OrderedDict()  # key -> [slide, generator, users, evicted]
    self._lock = threading.Lock()

  @contextlib.contextmanager
  def use(self, path: str):
    stamp = os.stat(path)
    key = (path, stamp.st_mtime_ns, stamp.st_size)  # a replaced file is opened afresh
    with self._lock:
      entry = self._open.get(key)
      if entry is not None:
        self._open.move_to_end(key)
        entry[2] += 1
    if entry is None:
      slide = slides.open_slide(path)  # outside the lock: a slow open does not hold up the others
      entry = [slide, deepzoom.DeepZoomGenerator(slide.handle, TILE_SIZE, OVERLAP, limit_bounds=False), 1, False]
      with self._lock:
        if key in self._open:  # opened twice at once: keep the first
          slide.close()
          entry = self._open[key]
          entry[2] += 1
        else:
          self._open[key] = entry
          self._evict()
    try:
      yield entry[0], entry[1]
    finally:
      with self._lock:
        entry[2] -= 1
        if entry[3] and entry[2] == 0:
          entry[0].close()

  def _evict(self) -> None:
    while len(self._open) > self.capacity:
      _, entry = self._open.popitem(last=False)
      entry[3] = True
      if entry[2] == 0:
        entry[0].close()

  def close(self) -> None:
    with self._lock:
      for entry in self._open.values():
        entry[3] = True
        if entry[2] == 0:
          entry[0].close()
      self._open.clear()


def _jpeg(image) -> bytes:
  buf = io.BytesIO()
  image.convert("RGB").save(buf, format="JPEG", quality=QUALITY)
  return buf.getvalue()


class Viewer:
  """The viewer's work, off the event loop: facts, thumbnails and tiles of gallery slides."""

  def __init__(self, engine, slides_root: str | None = None):
    self.files, self.open = SlideFiles(engine, slides_root), OpenSlides()

  def info(self, slide_id: str) -> dict:
    with self.open.use(self.files.path(slide_id)) as (slide, dz):
      return {"slide_id": slide_id, **self.files.facts(slide_id), "width": slide.dimensions[0],
              "height": slide.dimensions[1], "mpp": list(slide.mpp), "vendor": slide.vendor,
              "deepzoom": {"tile_size": TILE_SIZE, "overlap": OVERLAP, "format": FORMAT, "levels": dz.level_count,
                           "tiles": f"/api/slides/{slide_id}/tiles/"}}

  def thumbnail(self, slide_id: str, size: int) -> bytes:
    with self.open.use(self.files.path(slide_id)) as (slide, _):
      return _jpeg(slide.handle.get_thumbnail((size, size)))

  def tile(self, slide_id: str, level: int, col: int, row: int) -> bytes:
    with self.open.use(self.files.path(slide_id)) as (_, dz):
      if level >= dz.level_count:
        raise ViewerError(404, f"slide {slide_id!r} has Deep Zoom levels 0..{dz.level_count - 1}, not {level}")
      cols, rows = dz.level_tiles[level]
      if col >= cols or row >= rows:
        raise ViewerError(404, f"slide {slide_id!r} level {level} has {cols} x {rows} tiles; ({col}, {row}) is outside")
      return _jpeg(dz.get_tile(level, (col, row)))


def _number(raw: str, what: str) -> int:
  if not NUMBER.fullmatch(raw):
    raise ViewerError(400, f"{what} must be a non-negative integer, got {raw[:40]!r}")
  return int(raw)


def _slide_id(request: Request) -> str:
  slide_id = request.path_params["slide_id"]
  if not slide_id or len(slide_id) > MAX_ID or "\x00" in slide_id:
    raise ViewerError(400, "a slide id must be 1 to 512 characters")
  return slide_id


def routes(engine, guard, slides_root: str | None = None) -> list[Route]:
  """The viewer's routes, each behind `guard("picture", ...)` (the Gate's)."""
  viewer = Viewer(engine, slides_root)

  async def answer(work, media_type: str | None = None):
    try:
      body = await run_in_threadpool(work)
    except ViewerError as e:
      return JSONResponse({"error": str(e), "status": e.status}, status_code=e.status)
    except (slides.SlideError, openslide.OpenSlideError, OSError) as e:
      return JSONResponse({"error": f"the slide cannot be read: {e}", "status": 503}, status_code=503)
    if media_type is None:
      return JSONResponse(body)
    return Response(body, media_type=media_type, headers={"Cache-Control": "no-store"})

  async def info(request: Request):
    return await answer(lambda: viewer.info(_slide_id(request)))

  async def thumbnail(request: Request):
    def work():
      size = _number(request.query_params.get("size", "512"), "size")
      if not THUMBNAIL_PX[0] <= size <= THUMBNAIL_PX[1]:
        raise ViewerError(400, f"size must be {THUMBNAIL_PX[0]} to {THUMBNAIL_PX[1]} px, got {size}")
      return viewer.thumbnail(_slide_id(request), size)
    return await answer(work, "image/jpeg")

  async def tile(request: Request):
    p = request.path_params
    def work():
      found = re.fullmatch(r"([^_/]{1,7})_([^_/.]{1,7})\.jpe?g", p["name"])
      if found is None:
        raise ViewerError(400, f"a tile is named <col>_<row>.jpeg, got {p['name'][:60]!r}")
      return viewer.tile(_slide_id(request), _number(p["level"], "level"), _number(found.group(1), "column"),
                         _number(found.group(2), "row"))
    return await answer(work, "image/jpeg")

  async def other(request: Request):
    return JSONResponse({"error": f"no such slide resource {request.path_params['rest'][:80]!r}: use "
                                  "/api/slides/<id>/info, /thumbnail or /tiles/<level>/<col>_<row>.jpeg",
                         "status": 404}, status_code=404)

  return [Route("/api/slides/{slide_id}/info", guard("picture", info)),
          Route("/api/slides/{slide_id}/thumbnail", guard("picture", thumbnail)),
          Route("/api/slides/{slide_id}/tiles/{level}/{name}", guard("picture", tile)),
          Route("/api/slides/{rest:path}", guard("picture", other))]
