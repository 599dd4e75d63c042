"""A request's multipart upload, read under the size limit, and the service's JSON error answer.

Searches send one field, `image`; a curator's addition (POST /api/gallery) sends `image` with
the text fields `label`, `source_id` and `new_label`. The body is counted as it arrives, so a
missing or wrong Content-Length does not get past the limit (413), and an upload is only ever
handed on as bytes, to be decoded as an image (never unpickled).
"""

from __future__ import annotations

import dataclasses
import os

from starlette.requests import Request
from starlette.responses import JSONResponse

MiB = 1 << 20
MAX_TEXT = 1024  # characters of a text field; ids and labels are far shorter


class HTTPError(Exception):
  def __init__(self, status: int, message: str, headers: dict | None = None, **fields):
    super().__init__(message)
    self.status, self.headers, self.fields = status, headers or {}, fields


def error_response(e: HTTPError) -> JSONResponse:
  return JSONResponse({"error": str(e), "status": e.status, **e.fields}, status_code=e.status, headers=e.headers)


@dataclasses.dataclass
class Upload:
  name: str  # the file's base name (for messages; never logged: it can name a patient)
  data: bytes
  fields: dict[str, str]  # the text fields sent with it


async def read_body(request: Request, limit: int) -> bytes:
  declared = request.headers.get("content-length")
  if declared and declared.isdigit() and int(declared) > limit:
    raise HTTPError(413, f"upload of {int(declared)} bytes is over the limit of {limit} bytes "
                    f"({limit / MiB:g} MiB; the server's --max_upload_mb)")
  body = bytearray()
  async for chunk in request.stream():
    body += chunk
    if len(body) > limit:
      raise HTTPError(413, f"upload is over the limit of {limit} bytes ({limit / MiB:g} MiB; the server's "
                      "--max_upload_mb)")
  return bytes(body)


async def read_form(request: Request, limit: int, fields: tuple[str, ...] = ()) -> Upload:
  """The multipart field `image` and the text `fields` (absent ones are not in the result);
  413 past `limit` bytes, 400 for a body that is not such a form."""
  body = await read_body(request, limit)

  async def replay():
    return {"type": "http.request", "body": body, "more_body": False}
  try:
    form = await Request(request.scope, replay).form(max_files=1, max_fields=len(fields) + 4)
  except Exception as e:  # noqa: BLE001  (python-multipart's parse errors)
    raise HTTPError(400, f"the request body is not a multipart form with an image field: {e}") from e
  upload = form.get("image")
  if upload is None or isinstance(upload, str):
    raise HTTPError(400, "no file in the multipart field 'image' (send the image as form field 'image')")
  data = await upload.read()
  if not data:
    raise HTTPError(400, f"the uploaded file {upload.filename!r} is empty")
  text = {}
  for name in fields:
    value = form.get(name)
    if value is None:
      continue
    if not isinstance(value, str) or len(value) > MAX_TEXT:
      raise HTTPError(400, f"form field {name!r} must be a short text (at most {MAX_TEXT} characters), not a file")
    text[name] = value
  return Upload(os.path.basename(upload.filename or "upload"), data, text)


async def read_upload(request: Request, limit: int) -> tuple[str, bytes]:
  """(file name, bytes) of the multipart field `image` (a search's one field)."""
  upload = await read_form(request, limit)
  return upload.name, upload.data
