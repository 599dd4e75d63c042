"""The audit log: one JSON line per guarded request, appended, rotated by size.

Every line: `time` (UTC), `user`, `role`, `via` (token, session, proxy, none),
`client` (address; behind a trusted proxy, the one it reports), `method`,
`route`, `action`, `status` and `outcome` (ok, refused, unauthenticated,
forbidden, csrf, rate_limited, error). Route handlers add fields of their own
through `note(request, ...)`: a search adds its query's SHA-256 and size, k,
the generation it was answered from and the top answer; the curator routes
add `source_ids` (and `label` and the upload's digest and size for an add),
then, once written, the new `generation`, the rows added or removed and
whether the searcher was retrained; a refused change keeps its source ids. Nothing else reaches the
log: never a header, a cookie, a token or the image (the handler gets the
digest, not the bytes), nor the uploaded file's name (it can name a patient).

Rotation is the standard library's `RotatingFileHandler`: past `max_bytes`
the file becomes FILE.1 (FILE.1 becomes FILE.2, ... up to `backups`). The
file's mode follows the process umask (the systemd unit in
docs/serving-a-lab.md sets UMask=0077).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import logging.handlers
import os
import time

from histojax.service import tokens


def query_record(data: bytes) -> dict:
  """What the log keeps of an uploaded image: its digest and size, never its bytes."""
  return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def top_answer(answer: dict) -> dict | None:
  """The first source image of a search answer (else its vote), as the log keeps it."""
  sources = answer.get("sources") or []
  if sources:
    top = sources[0]
    return {"source_id": top.get("source_id"), "label": top.get("label"), "score": top.get("score")}
  vote = answer.get("vote")
  return {"label": vote.get("label"), "fraction": vote.get("fraction")} if vote else None


def note(request, **fields) -> None:
  """Fields for this request's audit line (a route handler's part of it)."""
  extra = getattr(request.state, "audit", None)
  if extra is None:
    extra = request.state.audit = {}
  extra.update(fields)


class AuditLog:
  """Appends events to `path`; `path=None` keeps none (and `GET /api/audit` says so)."""

  def __init__(self, path: str | None, max_bytes: int = 10 << 20, backups: int = 5, clock=time.time):
    self.path, self.clock = path, clock
    self._handler = None
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                           encoding="utf-8")
      self._handler.setFormatter(logging.Formatter("%(message)s"))

  @property
  def enabled(self) -> bool:
    return self._handler is not None

  def write(self, event: dict) -> None:
    if self._handler is None:
      return
    line = json.dumps({"time": tokens.now_iso(self.clock), **event}, sort_keys=False, default=str)
    self._handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))

  def tail(self, limit: int, user: str | None = None, outcome: str | None = None) -> list[dict]:
    """The last `limit` events (oldest first), from the file and, when short, its backups."""
    found: list[dict] = []
    for path in self._files_newest_first():
      matching = collections.deque(maxlen=limit)
      with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
          try:
            event = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line cut by a crash: the rest of the log still reads
          if (user is None or event.get("user") == user) and (outcome is None or event.get("outcome") == outcome):
            matching.append(event)
      found = list(matching) + found
      if len(found) >= limit:
        break
    return found[-limit:]

  def _files_newest_first(self) -> list[str]:
    if not self.path:
      return []
    names = [self.path] + [f"{self.path}.{i}" for i in range(1, self._handler.backupCount + 1)]
    return [p for p in names if os.path.exists(p)]

  def close(self) -> None:
    if self._handler is not None:
      self._handler.close()
