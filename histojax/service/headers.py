"""Response headers every answer carries, and CORS (closed unless `--cors_origins`).

The page's Content-Security-Policy allows scripts, styles and connections to
this origin only (no inline script: the page has none, every handler lives in
app.js), and images from this origin plus `blob:`, which the page needs for
the preview of the query image the user picked (an object URL). `data:` is
not allowed. Everything else (JSON, PNG, JS, CSS) gets `default-src 'none'`:
opened directly, it can run nothing. No other site may frame any of it.

A server without authentication on loopback also refuses a Host header that does not name
loopback (`LoopbackHosts`): otherwise a web page whose name was re-pointed at 127.0.0.1 (DNS
rebinding) would be same-origin with the service and could read its pictures; Jupyter checks
Host for the same reason.

`Cross-Origin-Resource-Policy: same-origin` stops other sites embedding the
gallery's pictures (patients' tissue) in their pages, even on loopback where
no credential is needed to fetch them. Strict-Transport-Security is left to
the TLS-terminating proxy, which knows whether TLS is in front.
"""

from __future__ import annotations

import json

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from histojax.service import auth

PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
OTHER_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
COMMON = {
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
    b"cross-origin-resource-policy": b"same-origin",
    b"cross-origin-opener-policy": b"same-origin",
}


class SecurityHeaders:
  """Pure ASGI middleware (no buffering of bodies): adds the headers above to every answer,
  and `Cache-Control: no-store` to /api/ answers that set none (they hold patients' data)."""

  def __init__(self, app):
    self.app = app

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    api = scope.get("path", "").startswith("/api/")

    async def with_headers(message):
      if message["type"] == "http.response.start":
        headers = list(message.get("headers", []))
        present = {name.lower() for name, _ in headers}
        html = any(n.lower() == b"content-type" and v.startswith(b"text/html") for n, v in headers)
        extra = {**COMMON, b"content-security-policy": (PAGE_CSP if html else OTHER_CSP).encode()}
        if api:
          extra[b"cache-control"] = b"no-store"
        headers += [(name, value) for name, value in extra.items() if name not in present]
        message = {**message, "headers": headers}
      await send(message)

    await self.app(scope, receive, with_headers)


def host_name(host: str) -> str:
  """The name in a Host header, without its port ('[::1]:8080' -> '::1')."""
  host = host.strip()
  if host.startswith("[") and "]" in host:
    name, rest = host[1:].split("]", 1)
    return name if rest == "" or (rest.startswith(":") and rest[1:].isdigit()) else host
  return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class LoopbackHosts:
  """400 for a request whose Host does not name loopback (a DNS-rebinding page)."""

  def __init__(self, app):
    self.app = app

  async def __call__(self, scope, receive, send):
    if scope["type"] == "http":
      host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
      if not auth.is_loopback(host_name(host)):
        body = json.dumps({"error": f"Host {host!r} is not this loopback server's: without authentication it "
                           "answers only to localhost, 127.0.0.1 or [::1]", "status": 400}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return
    await self.app(scope, receive, send)


def middleware(cors_origins: list[str] | tuple = (), loopback_hosts_only: bool = False) -> list[Middleware]:
  """The app's middleware, outermost first: headers on every answer (CORS preflights too)."""
  stack = [Middleware(SecurityHeaders)]
  if loopback_hosts_only:
    stack.append(Middleware(LoopbackHosts))
  if cors_origins:
    # Bearer tokens only: credentials (cookies) never cross origins, so a listed origin's page
    # cannot ride on a logged-in user's session.
    stack.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_credentials=False,
                            allow_methods=["GET", "POST", "DELETE"],
                            allow_headers=["Authorization", "Content-Type"], max_age=600))
  return stack
