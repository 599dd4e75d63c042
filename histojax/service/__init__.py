"""The search service on a lab's network: who may search, who may change the gallery, and a
record of both (the pieces `histojax.serve` is wired with; docs/serving-a-lab.md for operators).

- `tokens`: the two roles (reader, curator), the token file, the proxy's role map, and
  `python -m histojax.serve token add|list|revoke`;
- `sessions`: the page's session cookie and CSRF tokens;
- `auth`: the `Gate` every API route goes through (bearer token, trusted proxy, session
  cookie; CSRF and Origin; role), its own routes (login, logout, session, audit log), and the
  loopback rule for servers without authentication;
- `audit`: the append-only JSON-lines log, rotated by size;
- `limits`: per-user request rate and uploads in flight (429 with Retry-After);
- `headers`: CSP, nosniff, Referrer-Policy, framing, CORS (closed unless configured);
- `forms`: a multipart upload read under the size limit, and the JSON error answer;
- `curate`: the curator's write routes (add, remove a case) through `indexing.curator`.
- `viewer`: gallery slides' facts, thumbnails and Deep Zoom tiles for the page's viewer, read
  from the files the index manifest records (`--slides_root`), each route a `picture`.
"""

from __future__ import annotations

from absl import flags

from histojax.service import audit, auth, tokens

MiB = 1 << 20


def define_flags() -> None:
  flags.DEFINE_string("auth_tokens", None, "token file (JSON of digests and roles; `python -m histojax.serve token "
                      "add` makes it): requests need a token or a session opened with one")
  flags.DEFINE_list("trusted_proxy", [], "address(es) or CIDR block(s) of the reverse proxy whose user header is "
                    "believed; requests from anywhere else are not")
  flags.DEFINE_string("proxy_user_header", "X-Forwarded-User", "header in which the trusted proxy names the user")
  flags.DEFINE_string("proxy_roles", None, "JSON {\"user\": \"reader\"|\"curator\"} for users named by the proxy")
  flags.DEFINE_bool("insecure_no_auth", False, "listen on a non-loopback --host without authentication (read-only; "
                    "anyone who can reach it sees every gallery picture)")
  flags.DEFINE_float("session_hours", 12.0, "lifetime of a browser session opened at POST /api/login")
  flags.DEFINE_string("audit_log", None, "append a JSON line per API request to this file (GET /api/audit serves it)")
  flags.DEFINE_float("audit_max_mb", 10.0, "rotate the audit log past this size (MiB): FILE.1, FILE.2, ...")
  flags.DEFINE_integer("audit_backups", 5, "rotated audit files kept")
  flags.DEFINE_integer("rate_limit_per_min", 0, "API requests a minute per user (or address), 0: no limit; the page "
                       "fetches k thumbnails per search")
  flags.DEFINE_integer("max_concurrent_uploads", 0, "uploads (searches, additions) in flight per user, 0: no limit")
  flags.DEFINE_list("cors_origins", [], "other origins whose pages may call the API with bearer tokens (default "
                    "none: CORS closed)")


def gate(auth_tokens: str | None = None, trusted_proxy=(), proxy_user_header: str = "X-Forwarded-User",
         proxy_roles: str | None = None, audit_log: str | None = None, audit_max_mb: float = 10.0,
         audit_backups: int = 5, rate_limit_per_min: int = 0, max_concurrent_uploads: int = 0,
         session_hours: float = 12.0) -> auth.Gate:
  """The Gate the flags describe; ValueError (TokenFileError) names the flag or file at fault."""
  if bool(trusted_proxy) != bool(proxy_roles):
    raise ValueError("--trusted_proxy and --proxy_roles go together: the proxy's address, and the role of each "
                     "user it names")
  if not proxy_user_header.strip():
    raise ValueError("--proxy_user_header is empty")
  for flag, value in (("rate_limit_per_min", rate_limit_per_min), ("max_concurrent_uploads", max_concurrent_uploads)):
    if value < 0:
      raise ValueError(f"--{flag} must be 0 or more, got {value}")
  if audit_backups < 1:  # RotatingFileHandler without backups never rotates: the file would grow for ever
    raise ValueError(f"--audit_backups must be 1 or more, got {audit_backups}")
  if session_hours <= 0 or audit_max_mb <= 0:
    raise ValueError("--session_hours and --audit_max_mb must be positive")
  store = tokens.TokenStore(auth_tokens) if auth_tokens else None
  proxy = auth.Proxy(auth.parse_networks(list(trusted_proxy)), proxy_user_header.strip(),
                     tokens.ProxyRoles(proxy_roles)) if trusted_proxy else None
  return auth.Gate(store, proxy, audit.AuditLog(audit_log, int(audit_max_mb * MiB), audit_backups),
                   rate_limit_per_min, max_concurrent_uploads, session_hours * 3600)


def gate_from_flags(f) -> auth.Gate:
  return gate(f.auth_tokens, f.trusted_proxy, f.proxy_user_header, f.proxy_roles, f.audit_log, f.audit_max_mb,
              f.audit_backups, f.rate_limit_per_min, f.max_concurrent_uploads, f.session_hours)
