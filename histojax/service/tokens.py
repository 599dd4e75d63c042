"""Who may do what: the two roles, the token file and the proxy's role map.

    python -m histojax.serve token add --name NAME --role reader|curator --file FILE
    python -m histojax.serve token list --file FILE
    python -m histojax.serve token revoke --name NAME --file FILE

The token file is JSON, `{"tokens": [{"name", "role", "sha256", "created",
"revoked", "revoked_at"}, ...]}`: a token's SHA-256 digest, never the token
(which `token add` prints once and forgets). A running server re-reads the file
when it changes, so `token revoke` takes effect at the next request, and the
sessions opened with that token end with it.

A request's token is looked up by its digest and the stored digest is then
compared with `hmac.compare_digest`: the dictionary lookup's timing depends
only on the digest, which tells nothing about the token.

Refused files, each with an error naming the file (and the entry): missing,
not JSON, a field missing or of the wrong type, an unknown role, two entries
with one digest, and a file every user of the machine may write (anyone could
add a curator). A file damaged while the server runs fails closed: token
requests get 503 until it is fixed, never the old set silently.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys
import threading
import time

from absl import flags

from histojax import fileio

ROLES = ("reader", "curator")
READER_ACTIONS = frozenset({"search", "picture", "info"})
# add/remove are the curator write routes (POST /api/gallery, DELETE /api/gallery/sources/{id}).
CURATOR_ACTIONS = READER_ACTIONS | {"reload", "audit", "add", "remove"}
ALLOWED = {"reader": READER_ACTIONS, "curator": CURATOR_ACTIONS}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
DIGEST = re.compile(r"[0-9a-f]{64}")
FIELDS = {"name": str, "role": str, "sha256": str, "created": str, "revoked": bool}


class TokenFileError(ValueError):
  """A token or role file that cannot be used; the message names the file."""


def may(role: str, action: str) -> bool:
  return action in ALLOWED.get(role, ())


def digest(token: str) -> str:
  return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def now_iso(clock=time.time) -> str:
  return datetime.datetime.fromtimestamp(clock(), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Token:
  name: str
  role: str
  sha256: str
  created: str
  revoked: bool = False
  revoked_at: str | None = None


# --- Reading and writing the files -----------------------------------------------------

def _read_json(path: str, what: str):
  """The file's JSON, refused when missing, unreadable, not JSON or writable by every user."""
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    hint = f"; make one with: python -m histojax.serve token add --name NAME --role curator --file {path}" \
        if what == "token file" else ""
    raise TokenFileError(f"{what} {path} does not exist{hint}") from None
  if mode & stat.S_IWOTH:
    raise TokenFileError(f"{what} {path} is writable by every user of this machine (mode {stat.filemode(mode)}): "
                         f"anyone could give themselves a role; chmod o-w {path} (600 is best)")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise TokenFileError(f"{what} {path} is not valid JSON: {e}") from None
  except (OSError, UnicodeDecodeError) as e:
    raise TokenFileError(f"{what} {path} cannot be read: {e}") from None


def parse_tokens(data, path: str) -> list[Token]:
  if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
    raise TokenFileError(f"token file {path}: expected an object {{\"tokens\": [...]}}")
  tokens, seen = [], set()
  for i, entry in enumerate(data["tokens"]):
    where = f"token file {path}, entry {i}"
    if not isinstance(entry, dict):
      raise TokenFileError(f"{where}: expected an object, got {type(entry).__name__}")
    for field, kind in FIELDS.items():
      if not isinstance(entry.get(field), kind):
        raise TokenFileError(f"{where}: field {field!r} is missing or not a {kind.__name__}")
    if entry["role"] not in ROLES:
      raise TokenFileError(f"{where}: role {entry['role']!r} is not one of {', '.join(ROLES)}")
    if not DIGEST.fullmatch(entry["sha256"]):
      raise TokenFileError(f"{where}: 'sha256' must be 64 lowercase hex digits (a token's digest, not a token)")
    if entry["sha256"] in seen:
      raise TokenFileError(f"{where}: the same digest as an earlier entry")
    seen.add(entry["sha256"])
    tokens.append(Token(entry["name"], entry["role"], entry["sha256"], entry["created"], entry["revoked"],
                        entry.get("revoked_at")))
  return tokens


def read_tokens(path: str) -> list[Token]:
  return parse_tokens(_read_json(path, "token file"), path)


def write_tokens(path: str, tokens: list[Token]) -> None:
  """Whole or not at all (a server reading meanwhile sees the old file or the new), mode 600."""
  with fileio.atomic_open(path, "w") as f:
    os.fchmod(f.fileno(), 0o600)
    json.dump({"tokens": [dataclasses.asdict(t) for t in tokens]}, f, indent=2)
    f.write("\n")


def read_proxy_roles(path: str) -> dict[str, str]:
  """`{"user": "reader"|"curator", ...}`: the role of each user the proxy names."""
  data = _read_json(path, "proxy role file")
  if not isinstance(data, dict):
    raise TokenFileError(f"proxy role file {path}: expected an object {{\"user\": \"reader\" or \"curator\"}}")
  for user, role in data.items():
    if role not in ROLES:
      raise TokenFileError(f"proxy role file {path}, user {user!r}: role {role!r} is not one of {', '.join(ROLES)}")
  return dict(data)


# --- The server's view: looked up per request, re-read when the file changes -------------

class Watched:
  """A file parsed by `read`, re-read when its stat changes; a failed re-read fails closed."""

  def __init__(self, path: str, read):
    self.path, self._read, self._lock = path, read, threading.Lock()
    self._stamp, self.value, self.error = self._stat(), read(path), None

  def _stat(self):
    try:
      s = os.stat(self.path)
      return (s.st_mtime_ns, s.st_size, s.st_ino, s.st_mode)
    except OSError:
      return None

  def current(self):
    """The parsed file; raises TokenFileError while the file on disk cannot be used."""
    stamp = self._stat()
    with self._lock:
      if stamp != self._stamp:
        self._stamp = stamp
        try:
          self.value, self.error = self._read(self.path), None
        except TokenFileError as e:
          self.value, self.error = None, e
          print(f"histojax.serve: {e}; refusing its users until it is fixed", file=sys.stderr, flush=True)
      if self.error:
        raise self.error
      return self.value


class TokenStore:
  """The token file as the server sees it."""

  def __init__(self, path: str):
    self._file = Watched(path, lambda p: {t.sha256: t for t in read_tokens(p)})
    self.path = path

  def active(self) -> list[Token]:
    return [t for t in self._file.current().values() if not t.revoked]

  def by_digest(self, wanted: str) -> Token | None:
    """The entry (revoked or not) with this digest, confirmed by a constant-time comparison."""
    found = self._file.current().get(wanted)
    if found is None or not hmac.compare_digest(found.sha256.encode(), wanted.encode()):
      return None
    return found

  def lookup(self, token: str) -> Token | None:
    return self.by_digest(digest(token))


class ProxyRoles:
  def __init__(self, path: str):
    self._file, self.path = Watched(path, read_proxy_roles), path

  def role(self, user: str) -> str | None:
    return self._file.current().get(user)


# --- token add | list | revoke ------------------------------------------------------------

def add(path: str, name: str, role: str, clock=time.time) -> str:
  """Appends a new token's digest to `path` (created if missing) and returns the token."""
  if not NAME.fullmatch(name or ""):
    raise TokenFileError(f"token name {name!r}: use 1-64 letters, digits or ._@+- (starting with a letter or digit)")
  if role not in ROLES:
    raise TokenFileError(f"role {role!r} is not one of {', '.join(ROLES)}")
  with fileio.folder_lock(path):  # two `token add` at once: neither is lost
    tokens = read_tokens(path) if os.path.exists(path) else []
    if any(t.name == name and not t.revoked for t in tokens):
      raise TokenFileError(f"token file {path} already has an active token named {name!r}: revoke it first "
                           f"(token revoke --name {name} --file {path})")
    token = secrets.token_urlsafe(32)  # 256 random bits
    write_tokens(path, tokens + [Token(name, role, digest(token), now_iso(clock))])
  return token


def revoke(path: str, name: str, clock=time.time) -> int:
  with fileio.folder_lock(path):
    tokens = read_tokens(path)
    hit = [t for t in tokens if t.name == name and not t.revoked]
    if not hit:
      raise TokenFileError(f"token file {path} has no active token named {name!r}")
    stamp = now_iso(clock)
    write_tokens(path, [dataclasses.replace(t, revoked=True, revoked_at=stamp) if t in hit else t for t in tokens])
  return len(hit)


def listing(path: str) -> list[dict]:
  """What `token list` prints: everything but the digest (its first 8 digits, to tell tokens apart)."""
  return [{"name": t.name, "role": t.role, "created": t.created, "revoked": t.revoked, "revoked_at": t.revoked_at,
           "digest_prefix": t.sha256[:8]} for t in read_tokens(path)]


def define_flags() -> None:
  flags.DEFINE_string("file", None, "the token file (JSON; created by the first `token add`)", required=True)
  flags.DEFINE_string("name", None, "add/revoke: who the token is for")
  flags.DEFINE_enum("role", "reader", list(ROLES), "add: reader (search, pictures, info) or curator (also add, "
                    "remove, reload, audit log)")


def main(argv) -> int:
  """`python -m histojax.serve token add|list|revoke ...`."""
  f = flags.FLAGS
  command = argv[2] if len(argv) == 3 and argv[1] == "token" else None
  if command not in ("add", "list", "revoke"):
    raise SystemExit(f"usage: python -m histojax.serve token add|list|revoke --file FILE [--name NAME] "
                     f"[--role reader|curator]; got {argv[1:]}")
  if command != "list" and not f.name:
    raise SystemExit(f"token {command} needs --name")
  try:
    if command == "add":
      token = add(f.file, f.name, f.role)
      print(f"new {f.role} token for {f.name} (shown once; only its digest is kept in {f.file}):", file=sys.stderr)
      print(token)
    elif command == "revoke":
      print(f"revoked {revoke(f.file, f.name)} token(s) named {f.name}", file=sys.stderr)
    else:
      print(json.dumps(listing(f.file), indent=2))
  except TokenFileError as e:
    raise SystemExit(f"histojax.serve token {command}: {e}") from None
  return 0
