"""Who is asking, and may they: the guard every API route of `histojax.serve` goes through.

A request is identified, in this order, by
1. `Authorization: Bearer TOKEN` (API clients): a token of `--auth_tokens`;
2. the `--proxy_user_header` (X-Forwarded-User) of a request whose peer
   address is a `--trusted_proxy`, with the role `--proxy_roles` gives that
   user; the header from any other address is not believed;
3. the session cookie of `POST /api/login` (the page).
A credential that is given but wrong (unknown or revoked token, expired
session) is 401, never a fall-back to the next; no credential is 401; a
known user whose role may not do the route's action is 403.

Without `--auth_tokens` or a proxy, everyone is the anonymous reader: search,
pictures and info answer as before, the curator actions answer 403 saying
how to enable them (`READ_ONLY`), and a non-loopback --host is refused
(`check_bind`).

State-changing requests (any method but GET/HEAD/OPTIONS) made with the
cookie or through the proxy need the CSRF token (`X-CSRF-Token`) and an
Origin equal to this server's own (scheme from the trusted proxy's
X-Forwarded-Proto, host from Host). Bearer requests need neither: a browser
never adds an Authorization header on its own.

`Gate.guard(action, handler)` wraps a route: identify, rate limit, CSRF,
role, the upload slot for uploads, then the handler, then one audit line
whatever happened. The curator routes (POST /api/gallery with action "add",
DELETE /api/gallery/sources/{id} with "remove", histojax.service.curate) are
one `guard` call each; their handlers add `source_ids` and `generation` to
the audit line with `audit.note`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import json
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from histojax.service import audit, limits, sessions, tokens

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_LOGIN_BYTES = 4096
READ_ONLY = ("this server runs without authentication, so it is read-only: reload, adding and removing cases "
             "and the audit log need a curator. Start it with --auth_tokens FILE (make a curator token with: "
             "python -m histojax.serve token add --name NAME --role curator --file FILE), or behind a proxy "
             "with --trusted_proxy ADDR --proxy_user_header X-Forwarded-User --proxy_roles FILE")
LOOPBACK_NAMES = ("localhost", "ip6-localhost")


@dataclasses.dataclass(frozen=True)
class Principal:
  user: str
  role: str
  via: str  # token | session | proxy | none
  csrf: str | None = None


ANONYMOUS = Principal("anonymous", "reader", "none")


class Denied(Exception):
  """An answer other than the handler's: status, message, the audit outcome, who it was (if known)."""

  def __init__(self, status: int, message: str, outcome: str, user: str | None = None, headers=None):
    super().__init__(message)
    self.status, self.outcome, self.user, self.headers = status, outcome, user, headers or {}

  def response(self) -> JSONResponse:
    return JSONResponse({"error": str(self), "status": self.status}, self.status, headers=self.headers)


def unauthenticated(message: str, user: str | None = None) -> Denied:
  return Denied(401, message, "unauthenticated", user, {"WWW-Authenticate": 'Bearer realm="histojax"'})


@dataclasses.dataclass(frozen=True)
class Proxy:
  networks: tuple
  user_header: str
  roles: tokens.ProxyRoles


def parse_networks(addresses: list[str]) -> tuple:
  """--trusted_proxy values (addresses or CIDR blocks) as networks; a bad one names itself."""
  try:
    return tuple(ipaddress.ip_network(a.strip(), strict=False) for a in addresses if a.strip())
  except ValueError as e:
    raise ValueError(f"--trusted_proxy: {e} (give IP addresses or CIDR blocks, comma-separated)") from None


def is_loopback(host: str) -> bool:
  if host.lower() in LOOPBACK_NAMES:
    return True
  try:
    return ipaddress.ip_address(host.strip("[]")).is_loopback
  except ValueError:
    return False


def check_bind(host: str, authenticated: bool, insecure: bool) -> str | None:
  """Raises SystemExit for a non-loopback host without authentication; the start-up warning, if any."""
  if authenticated:
    return "histojax.serve: --insecure_no_auth has no effect: authentication is configured" if insecure else None
  if insecure:
    return (f"histojax.serve: WARNING --insecure_no_auth: anyone who can reach {host} can search and see every "
            "gallery picture (patients' tissue), with no record of who did; changes stay off (read-only)")
  if is_loopback(host):
    return None
  raise SystemExit(f"histojax.serve: refusing --host {host} without authentication: give --auth_tokens FILE (or "
                   "--trusted_proxy with --proxy_roles), or --insecure_no_auth to expose it anyway")


class Gate:
  """Identifies, limits, authorises and audits the requests of one app."""

  def __init__(self, token_store: tokens.TokenStore | None = None, proxy: Proxy | None = None,
               audit_log: audit.AuditLog | None = None, rate_limit_per_min: int = 0, max_concurrent_uploads: int = 0,
               session_seconds: float = 12 * 3600, clock=time.time, monotonic=time.monotonic):
    self.tokens, self.proxy = token_store, proxy
    self.audit = audit_log or audit.AuditLog(None)
    self.rate = limits.RateLimit(rate_limit_per_min, monotonic)
    self.uploads = limits.Uploads(max_concurrent_uploads)
    self.sessions = sessions.Sessions(session_seconds, clock)

  @property
  def enabled(self) -> bool:
    return self.tokens is not None or self.proxy is not None

  # --- Facts about the request (believing the proxy only when it is the peer) ------------

  def trusted(self, request: Request) -> bool:
    if self.proxy is None or request.client is None:
      return False
    try:
      peer = ipaddress.ip_address(request.client.host)
    except ValueError:
      return False
    return any(peer in network for network in self.proxy.networks)

  def client(self, request: Request) -> str:
    """The client's address: the peer, or the last hop the trusted proxy appended."""
    peer = request.client.host if request.client else ""
    if not self.trusted(request):
      return peer
    return request.headers.get("x-forwarded-for", "").split(",")[-1].strip() or peer

  def user_key(self, request: Request, principal: Principal | None) -> str:
    """Whose limits a request counts against: the user, or the address of one without a name."""
    return principal.user if principal and principal.via != "none" else f"address {self.client(request)}"

  def scheme(self, request: Request) -> str:
    proto = request.headers.get("x-forwarded-proto", "").lower()
    return proto if proto in ("http", "https") and self.trusted(request) else request.url.scheme

  def origin(self, request: Request) -> str:
    return normal_origin(f"{self.scheme(request)}://{request.headers.get('host', '')}")

  # --- Identify, check, authorise ----------------------------------------------------------

  def identify(self, request: Request) -> Principal:
    if not self.enabled:
      return ANONYMOUS
    header = request.headers.get("authorization")
    if header is not None:
      return self._bearer(header)
    user = request.headers.get(self.proxy.user_header, "").strip() if self.proxy else ""
    if user and self.trusted(request):
      return self._proxy_user(user)
    cookie = request.cookies.get(sessions.COOKIE)
    if cookie:
      return self._session(cookie)
    if user:
      raise unauthenticated(f"{self.proxy.user_header} is believed only from the trusted proxy, not from "
                            f"{request.client.host if request.client else 'this address'}")
    raise unauthenticated("authentication required: send 'Authorization: Bearer TOKEN', or log in "
                          "(POST /api/login) for a session cookie")

  def _token(self, token: str) -> tokens.Token | None:
    if self.tokens is None:
      raise unauthenticated("this server takes no tokens: its users come from the proxy")
    try:
      return self.tokens.lookup(token)
    except tokens.TokenFileError:  # printed by the store; the detail is for the operator, not the client
      raise Denied(503, "the server's token file cannot be used right now (see the server's log)", "error") from None

  def _bearer(self, header: str) -> Principal:
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
      raise unauthenticated("the Authorization header must be 'Bearer TOKEN'")
    found = self._token(token.strip())
    if found is None:
      raise unauthenticated("unknown token")
    if found.revoked:
      raise unauthenticated(f"this token was revoked on {found.revoked_at}", found.name)
    return Principal(found.name, found.role, "token")

  def _proxy_user(self, user: str) -> Principal:
    if len(user) > 256 or not user.isprintable():
      raise unauthenticated(f"the proxy's {self.proxy.user_header} is not a user name")
    try:
      role = self.proxy.roles.role(user)
    except tokens.TokenFileError:
      raise Denied(503, "the server's proxy role file cannot be used right now (see the server's log)", "error") \
          from None
    if role is None:
      raise Denied(403, f"user {user!r} has no role in the server's --proxy_roles file", "forbidden", user)
    return Principal(user, role, "proxy", self.sessions.proxy_csrf(user))

  def _session(self, cookie: str) -> Principal:
    session, why = self.sessions.get(cookie)
    if session is None:
      raise unauthenticated("your session has expired: log in again" if why == "expired"
                            else "unknown session (the server restarted, or you logged out): log in again")
    found = self._token_by_digest(session.token_sha256)
    if found is None or found.revoked:
      self.sessions.end(cookie)
      raise unauthenticated("the token this session was opened with has been revoked", session.user)
    return Principal(found.name, found.role, "session", session.csrf)

  def _token_by_digest(self, digest: str) -> tokens.Token | None:
    try:
      return self.tokens.by_digest(digest)
    except tokens.TokenFileError:
      raise Denied(503, "the server's token file cannot be used right now (see the server's log)", "error") from None

  def check_origin(self, request: Request, required: bool) -> None:
    given = request.headers.get("origin")
    if given is None and not required:
      return
    if given is None or normal_origin(given) != self.origin(request):
      raise Denied(403, f"cross-origin request refused: Origin {given!r} is not this server's "
                   f"({self.origin(request)})", "csrf")

  def check_csrf(self, request: Request, principal: Principal) -> None:
    """For state-changing requests riding on a cookie (ours or the proxy's)."""
    if request.method in SAFE_METHODS or principal.via not in ("session", "proxy"):
      return
    self.check_origin(request, required=True)
    if not sessions.same_secret(request.headers.get(sessions.CSRF_HEADER), principal.csrf):
      raise Denied(403, f"missing or wrong {sessions.CSRF_HEADER} header (the login answer gives it, and "
                   "GET /api/session again)", "csrf", principal.user)

  @staticmethod
  def authorize(principal: Principal, action: str) -> None:
    if tokens.may(principal.role, action):
      return
    if principal.via == "none":
      raise Denied(403, READ_ONLY, "forbidden")
    raise Denied(403, f"{principal.user} is a {principal.role}: {action} needs the curator role", "forbidden",
                 principal.user)

  # --- The guard ---------------------------------------------------------------------------

  def guard(self, action: str | None, handler, upload: bool = False):
    """`handler` behind identification, the limits, CSRF and the role `action` needs (None: a
    route open to all, which identifies whoever it needs itself), with one audit line."""
    async def endpoint(request: Request):
      request.state.principal = None
      try:
        response = await self._checked(request, action, handler, upload)
      except Denied as e:
        response = e.response()
        request.state.denied = e
      except limits.TooMany as e:
        response = JSONResponse({"error": str(e), "status": 429}, 429, headers={"Retry-After": str(e.retry_after)})
      except Exception:
        self._record(request, action or handler.__name__, 500)
        raise
      self._record(request, action or handler.__name__, response.status_code)
      return response
    endpoint.__name__ = getattr(handler, "__name__", "endpoint")
    return endpoint

  async def _checked(self, request: Request, action, handler, upload: bool):
    if action is None:
      self.rate.take(self.user_key(request, None))
      return await handler(request)
    try:
      principal = self.identify(request)
    except Denied:
      self.rate.take(self.user_key(request, None))  # guessing is limited as well
      raise
    request.state.principal = principal
    self.rate.take(self.user_key(request, principal))
    self.check_csrf(request, principal)
    self.authorize(principal, action)
    with self.uploads.slot(self.user_key(request, principal)) if upload else contextlib.nullcontext():
      return await handler(request)

  def _record(self, request: Request, action, status: int) -> None:
    principal, denied = request.state.principal, getattr(request.state, "denied", None)
    outcome = (denied.outcome if denied else "ok" if status < 400 else "rate_limited" if status == 429
               else "refused" if status < 500 else "error")
    event = {"user": principal.user if principal else denied.user if denied else None,
             "role": principal.role if principal else None, "via": principal.via if principal else None,
             "client": self.client(request), "method": request.method, "route": request.url.path,
             "action": action, "status": status, "outcome": outcome}
    if denied:
      event["reason"] = str(denied)
    self.audit.write({**event, **getattr(request.state, "audit", {})})

  # --- Routes of its own: login, logout, who am I, the audit log ---------------------------

  def routes(self) -> list[Route]:
    return [Route("/api/login", self.guard(None, self.login), methods=["POST"]),
            Route("/api/logout", self.guard(None, self.logout), methods=["POST"]),
            Route("/api/session", self.session_info),
            Route("/api/audit", self.guard("audit", self.audit_entries))]

  async def login(self, request: Request) -> JSONResponse:
    if self.tokens is None:
      raise Denied(403, "there is nothing to log in to: " + ("users come from the proxy" if self.proxy else READ_ONLY),
                   "forbidden")
    self.check_origin(request, required=False)  # a page elsewhere may not log the browser in (login CSRF)
    token = await read_login_token(request)
    found = self._token(token) if token else None
    if found is None or found.revoked:
      raise unauthenticated("no token given" if not token else "unknown or revoked token",
                            found.name if found else None)
    cookie, session = self.sessions.open(found.name, found.role, found.sha256)
    request.state.principal = Principal(found.name, found.role, "session", session.csrf)
    response = JSONResponse({"user": found.name, "role": found.role, "csrf_token": session.csrf,
                             "expires": iso(session.expires), "may": sorted(tokens.ALLOWED[found.role])})
    response.set_cookie(sessions.COOKIE, cookie, max_age=int(self.sessions.lifetime_s), path="/", httponly=True,
                        samesite="strict", secure=self.scheme(request) == "https")
    return response

  async def logout(self, request: Request) -> JSONResponse:
    cookie, ended = request.cookies.get(sessions.COOKIE), False
    session = self.sessions.get(cookie)[0] if cookie else None
    if session is not None:
      principal = Principal(session.user, session.role, "session", session.csrf)
      request.state.principal = principal
      self.check_csrf(request, principal)  # a foreign page may not end the session either
      ended = self.sessions.end(cookie)
    response = JSONResponse({"logged_out": ended})
    response.delete_cookie(sessions.COOKIE, path="/", httponly=True, samesite="strict",
                           secure=self.scheme(request) == "https")
    return response

  async def session_info(self, request: Request) -> JSONResponse:
    """What the page asks first: is a login needed, who is logged in, their CSRF token."""
    answer = {"auth": {"tokens": self.tokens is not None, "proxy": self.proxy is not None}, "user": None,
              "role": None, "via": None, "csrf_token": None, "may": []}
    try:
      self.rate.take(self.user_key(request, None))  # it checks credentials too: no free guessing here
    except limits.TooMany as e:
      return JSONResponse({"error": str(e), "status": 429}, 429, headers={"Retry-After": str(e.retry_after)})
    try:
      principal = self.identify(request)
    except Denied as e:
      return JSONResponse({**answer, "reason": str(e)})
    return JSONResponse({**answer, "user": principal.user, "role": principal.role, "via": principal.via,
                         "csrf_token": principal.csrf, "may": sorted(tokens.ALLOWED[principal.role])})

  async def audit_entries(self, request: Request) -> JSONResponse:
    if not self.audit.enabled:
      raise Denied(404, "this server keeps no audit log: start it with --audit_log FILE", "refused")
    raw = request.query_params.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
      raise Denied(400, f"limit must be an integer from 1 to 10000, got {raw!r}", "refused")
    entries = await run_in_threadpool(self.audit.tail, int(raw), request.query_params.get("user"),
                                      request.query_params.get("outcome"))
    return JSONResponse({"entries": entries, "count": len(entries)})


def normal_origin(origin: str) -> str:
  """scheme://host[:port], lower case, the scheme's default port dropped."""
  origin = origin.strip().lower().rstrip("/")
  for scheme, port in (("http://", ":80"), ("https://", ":443")):
    if origin.startswith(scheme) and origin.endswith(port):
      return origin[:-len(port)]
  return origin


def iso(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def read_login_token(request: Request) -> str:
  """The token of a JSON body {"token": "..."}, read up to MAX_LOGIN_BYTES."""
  body = bytearray()
  async for chunk in request.stream():
    body += chunk
    if len(body) > MAX_LOGIN_BYTES:
      raise Denied(413, f"a login body is at most {MAX_LOGIN_BYTES} bytes", "refused")
  try:
    data = json.loads(bytes(body) or b"{}")
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise Denied(400, 'send the token as JSON: {"token": "..."}', "refused") from None
  token = data.get("token") if isinstance(data, dict) else None
  if token is not None and not isinstance(token, str):
    raise Denied(400, 'send the token as JSON: {"token": "..."}', "refused")
  return (token or "").strip()
