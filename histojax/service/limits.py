"""Per-user limits: a request rate and a number of uploads in flight, both answered 429.

A user is a name (token, session or proxy) or, for a request without one, its
client address, so failed logins are limited too. 0 turns a limit off (the
default: on loopback without authentication everybody is one user).

- rate: a token bucket per user holding `per_minute` requests, refilled at
  `per_minute / 60` a second; an empty bucket answers Retry-After = seconds
  until the next request would pass. The page loads k thumbnails per search,
  so count those when sizing it.
- uploads: searches and gallery additions whose body is being received,
  decoded or answered; one more than `max_concurrent` is refused at once with
  Retry-After: 1 rather than queued, so one user cannot fill the batcher.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time

MAX_USERS = 10_000  # buckets kept; full (idle) ones are forgotten beyond this


class TooMany(Exception):
  def __init__(self, message: str, retry_after: int):
    super().__init__(message)
    self.retry_after = max(1, int(retry_after))


class RateLimit:
  def __init__(self, per_minute: int, clock=time.monotonic):
    self.per_minute, self.clock = per_minute, clock
    self._buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, when)
    self._lock = threading.Lock()

  def take(self, user: str) -> None:
    """One request of `user`; raises TooMany when its bucket is empty."""
    if self.per_minute <= 0:
      return
    rate = self.per_minute / 60.0
    with self._lock:
      now = self.clock()
      tokens, when = self._buckets.get(user, (float(self.per_minute), now))
      tokens = min(float(self.per_minute), tokens + (now - when) * rate)
      if tokens < 1.0:
        self._buckets[user] = (tokens, now)
        raise TooMany(f"more than {self.per_minute} requests a minute from {user}; slow down "
                      "(the server's --rate_limit_per_min)", math.ceil((1.0 - tokens) / rate))
      self._buckets[user] = (tokens - 1.0, now)
      if len(self._buckets) > MAX_USERS:
        self._forget_idle(now, rate)

  def _forget_idle(self, now: float, rate: float) -> None:
    full = [u for u, (t, w) in self._buckets.items() if t + (now - w) * rate >= self.per_minute]
    for user in full:
      del self._buckets[user]


class Uploads:
  def __init__(self, max_concurrent: int):
    self.max_concurrent = max_concurrent
    self._running: dict[str, int] = {}
    self._lock = threading.Lock()

  @contextlib.contextmanager
  def slot(self, user: str):
    """Held while one upload of `user` is received and answered; raises TooMany past the limit."""
    if self.max_concurrent <= 0:
      yield
      return
    with self._lock:
      if self._running.get(user, 0) >= self.max_concurrent:
        raise TooMany(f"{user} already has {self.max_concurrent} uploads in flight; wait for one to finish "
                      "(the server's --max_concurrent_uploads)", 1)
      self._running[user] = self._running.get(user, 0) + 1
    try:
      yield
    finally:
      with self._lock:
        self._running[user] -= 1
        if not self._running[user]:
          del self._running[user]
