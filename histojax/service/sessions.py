"""Browser sessions: a token exchanged once (`POST /api/login`) for a session cookie.

The cookie holds 256 random bits; the server keeps only their SHA-256, with the
user, role, the digest of the token that opened the session (so revoking the
token ends its sessions), the expiry and the session's CSRF token. Sessions
live in the server's memory: a restart logs everyone out, which is the safe
side of forgetting.

CSRF: a state-changing request made with the cookie must carry the session's
CSRF token in `X-CSRF-Token` (given in the login answer and by `GET
/api/session`, which another origin cannot read). A user the proxy vouches
for has no session here, and the proxy's own cookie rides along with every
request just the same, so they get a CSRF token derived from their name with
a key that lives as long as the process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import threading
import time

COOKIE = "histojax_session"
CSRF_HEADER = "X-CSRF-Token"


@dataclasses.dataclass(frozen=True)
class Session:
  user: str
  role: str
  token_sha256: str
  expires: float
  csrf: str


class Sessions:
  """Open sessions by the digest of their cookie; at most `limit`, the oldest dropped first."""

  def __init__(self, lifetime_s: float, clock=time.time, limit: int = 10_000):
    self.lifetime_s, self.clock, self.limit = lifetime_s, clock, limit
    self._open: dict[str, Session] = {}
    self._lock = threading.Lock()
    self._key = secrets.token_bytes(32)

  @staticmethod
  def _id(cookie: str) -> str:
    return hashlib.sha256(cookie.encode("utf-8", "surrogatepass")).hexdigest()

  def open(self, user: str, role: str, token_sha256: str) -> tuple[str, Session]:
    """(cookie value, session)."""
    cookie = secrets.token_urlsafe(32)
    session = Session(user, role, token_sha256, self.clock() + self.lifetime_s, secrets.token_urlsafe(32))
    with self._lock:
      now = self.clock()
      self._open = {k: s for k, s in self._open.items() if s.expires > now}
      while len(self._open) >= self.limit:
        self._open.pop(next(iter(self._open)))
      self._open[self._id(cookie)] = session
    return cookie, session

  def get(self, cookie: str) -> tuple[Session | None, str]:
    """(session, "") or (None, why: "unknown" | "expired")."""
    with self._lock:
      session = self._open.get(self._id(cookie))
      if session is None:
        return None, "unknown"
      if session.expires <= self.clock():
        del self._open[self._id(cookie)]
        return None, "expired"
    return session, ""

  def end(self, cookie: str) -> bool:
    with self._lock:
      return self._open.pop(self._id(cookie), None) is not None

  def proxy_csrf(self, user: str) -> str:
    return hmac.new(self._key, f"proxy-user:{user}".encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def same_secret(given: str | None, expected: str | None) -> bool:
  if not given or not expected:
    return False
  return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))
