"""The service on a lab's network (histojax.service): who may call which route, sessions and
CSRF, the proxy, tokens on disk, the audit log, limits and headers, and the sign-in page in
Chromium.

The app is the real `serve.build_app` around a stand-in query engine (no model: these tests
are about the gate, not the search) over a copy of the compat fixture's grown index, whose
added rows (48..51) carry their own pictures, so gallery images answer without TFDS.
"""

import base64
import concurrent.futures
import hashlib
import hmac
import html.parser
import io
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import threading
import time
import warnings

import httpx
import numpy as np
import PIL.Image
import pytest
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():  # Starlette 1.x would have httpx2 under its TestClient; httpx is the pinned one
  warnings.simplefilter("ignore", StarletteDeprecationWarning)
  from starlette.testclient import TestClient

from histojax import indexing, query, serve, service
from histojax.service import audit, auth, headers, sessions, tokens

ROOT = pathlib.Path(__file__).resolve().parents[1]
GROWN = ROOT / "tests" / "fixtures" / "compat" / "indexes" / "grown"
PROXY, STRANGER = "10.0.0.1", "10.0.0.99"
ORIGIN = "http://testserver"
LIFETIME = 3600.0
CHROMIUM = "/usr/bin/chromium"


class FakeEmbedding:
  """The model a gallery addition is embedded with: the patch's mean colour over a 4 x 4 grid
  (48 numbers), the first 32 of them (the index's dim)."""

  @staticmethod
  def expected_by(manifest):
    return {}

  @staticmethod
  def embed(patches):
    n, s = len(patches), patches.shape[1] // 4 * 4
    grid = patches[:, :s, :s].reshape(n, 4, s // 4, 4, s // 4, 3).astype(np.float32).mean(axis=(2, 4))
    return grid.reshape(n, 48)[:, :32] - 127.5


class FakeEngine:
  """What build_app needs of a QueryEngine; answers name gallery rows 48..51 (pictures in the
  index). Additions go through the real curator (the real cut, a stand-in embedding)."""

  model = FakeEmbedding

  def __init__(self, index_dir, block: threading.Event | None = None):
    self.index_dir, self.block, self.reloads = index_dir, block, 0
    self._load()

  def _load(self):
    self.manifest, self.rows = indexing.read_manifest(self.index_dir), indexing.load_rows(self.index_dir)
    self.class_names = list(self.manifest["class_names"])
    self.num_rows, self.image_size, self.tiling = len(self.rows["label"]), 48, dict(self.manifest["tiling"])
    self._stamp = os.stat(os.path.join(self.index_dir, "manifest.json")).st_mtime_ns

  def cut(self, image):
    return query.cut(image, self.tiling, self.image_size)

  def answer_batch(self, queries, k):
    if self.block is not None:
      self.block.wait(60)
    out = []
    for name, image in queries:
      results = [{"rank": r + 1, "gallery_row": 48 + r % 4, "label": "stroma", "label_id": 1, "source_id": "added1",
                  "coords": [0, 0], "score": round(0.9 - 0.01 * r, 6)} for r in range(k)]
      out.append({"query": name, "height": int(image.shape[0]), "width": int(image.shape[1]),
                  "tiling": self.tiling, "tiles_searched": 1, "tiles_dropped": 0,
                  "vote": {"label": "stroma", "label_id": 1, "fraction": 1.0, "votes": {"stroma": 1}},
                  "sources": [{"rank": 1, "source_id": "added1", "label": "stroma", "label_id": 1, "score": 0.9,
                               "tiles_matched": 1}],
                  "tiles": [{"y": 0, "x": 0, "results": results, "tissue_fraction": None}]})
    return out

  def reload_if_changed(self):
    self.reloads += 1
    if os.stat(os.path.join(self.index_dir, "manifest.json")).st_mtime_ns == self._stamp:
      return False
    self._load()
    return True


class Clock:
  def __init__(self, now=1_000_000.0):
    self.now = now

  def __call__(self):
    return self.now


def with_peer(app):
  """The ASGI app with the peer address taken from the test's `x-test-peer` header (what
  uvicorn takes from the socket), so one client can speak from several addresses."""
  async def wrapped(scope, receive, send):
    if scope["type"] == "http":
      peer = dict(scope["headers"]).get(b"x-test-peer")
      if peer:
        scope = {**scope, "client": (peer.decode(), 40000)}
    await app(scope, receive, send)
  return wrapped


def png(seed=0, size=64) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
  """Token file (rita reader, carl curator, rex revoked), proxy roles (pat reader, cora curator)."""
  folder = tmp_path_factory.mktemp("lab")
  index_dir = folder / "index"
  shutil.copytree(GROWN, index_dir)
  token_file = str(folder / "tokens.json")
  issued = {name: tokens.add(token_file, name, role) for name, role in
            [("rita", "reader"), ("carl", "curator"), ("rex", "reader")]}
  tokens.revoke(token_file, "rex")
  roles = folder / "proxy_roles.json"
  roles.write_text(json.dumps({"pat": "reader", "cora": "curator"}))
  return {"folder": folder, "index": str(index_dir), "tokens": token_file, "roles": str(roles), "issued": issued}


def make_gate(lab, proxy=True, audit_path=None, clock=None, **options):
  proxy_cfg = auth.Proxy(auth.parse_networks([PROXY]), "X-Forwarded-User", tokens.ProxyRoles(lab["roles"])) \
      if proxy else None
  return auth.Gate(tokens.TokenStore(lab["tokens"]), proxy_cfg, audit.AuditLog(audit_path),
                   session_seconds=LIFETIME, clock=clock or Clock(), **options)


def make_app(lab, gate=None, engine=None, index_dir=None, **options):
  index_dir = index_dir or lab["index"]
  return serve.build_app(engine or FakeEngine(index_dir), index_dir, str(lab["folder"] / "no_tfds"),
                         gate=gate, **options)


def own_index(tmp_path) -> str:
  """A copy of the grown index for a test that changes it (lab's stays at generation 2)."""
  shutil.copytree(GROWN, tmp_path / "index")
  return str(tmp_path / "index")


@pytest.fixture(scope="module")
def secured(lab, tmp_path_factory):
  """A TestClient on an app with tokens, the proxy and an audit log over an index of its own
  (the curator routes change it); its clock moves on demand."""
  clock = Clock()
  gate = make_gate(lab, audit_path=str(lab["folder"] / "audit.jsonl"), clock=clock)
  index_dir = own_index(tmp_path_factory.mktemp("secured"))
  with TestClient(with_peer(make_app(lab, gate, index_dir=index_dir)), base_url=ORIGIN) as client:
    client.clock, client.gate, client.index, client.audit = clock, gate, index_dir, lab["folder"] / "audit.jsonl"
    yield client


def served_generation(client) -> int:
  return serve.generation(indexing.read_manifest(client.index))


def call(client, method, path, headers=None, cookie=None, **kwargs):
  """One request with exactly the given credentials (the client's cookie jar is emptied)."""
  client.cookies.clear()
  headers = dict(headers or {})
  if cookie:
    headers["Cookie"] = f"{sessions.COOKIE}={cookie}"
  response = client.request(method, path, headers=headers, **kwargs)
  client.cookies.clear()
  return response


def login(client, token, origin=ORIGIN):
  response = call(client, "POST", "/api/login", headers={"Origin": origin} if origin else {}, json={"token": token})
  assert response.status_code == 200, response.text
  return response.cookies[sessions.COOKIE], response.json()["csrf_token"]


# --- The matrix: route x credential ---------------------------------------------------

def session_of(name):
  def make(client, lab):
    cookie, csrf = login(client, lab["issued"][name])
    return {"cookie": cookie, "headers": {sessions.CSRF_HEADER: csrf, "Origin": ORIGIN}}
  return make


def expired_session(client, lab):
  cookie, csrf = login(client, lab["issued"]["rita"])
  client.clock.now += LIFETIME + 1
  return {"cookie": cookie, "headers": {sessions.CSRF_HEADER: csrf, "Origin": ORIGIN}}


def proxy_user(user, peer):
  def make(client, lab):
    base = {"x-test-peer": peer, "X-Forwarded-User": user}
    csrf = call(client, "GET", "/api/session", headers=base).json()["csrf_token"]
    return {"headers": {**base, "Origin": ORIGIN, **({sessions.CSRF_HEADER: csrf} if csrf else {})}}
  return make


def bearer(name_or_token):
  def make(client, lab):
    return {"headers": {"Authorization": f"Bearer {lab['issued'].get(name_or_token, name_or_token)}"},
            "token": lab["issued"].get(name_or_token, name_or_token)}
  return make


CREDENTIALS = {  # name: (how to make it, who it is: a status it must get, or a role)
    "none": (lambda c, lab: {}, 401),
    "wrong token": (bearer("not-a-token-" + "x" * 30), 401),
    "revoked token": (bearer("rex"), 401),
    "expired session": (expired_session, 401),
    "reader token": (bearer("rita"), "reader"),
    "curator token": (bearer("carl"), "curator"),
    "reader session": (session_of("rita"), "reader"),
    "curator session": (session_of("carl"), "curator"),
    "proxy reader, trusted address": (proxy_user("pat", PROXY), "reader"),
    "proxy curator, trusted address": (proxy_user("cora", PROXY), "curator"),
    "proxy curator, untrusted address": (proxy_user("cora", STRANGER), 401),
    "proxy user without a role": (proxy_user("mallory", PROXY), 403),
}
ROUTES = {  # name: (method, path, what it needs: public | login | an action)
    "page": ("GET", "/", "public"), "healthz": ("GET", "/healthz", "public"),
    "session": ("GET", "/api/session", "public"), "info": ("GET", "/api/info", "info"),
    "search": ("POST", "/api/search", "search"), "gallery image": ("GET", "/api/gallery/48/image", "picture"),
    "reload": ("POST", "/api/reload", "reload"), "audit": ("GET", "/api/audit", "audit"),
    "login": ("POST", "/api/login", "login"), "logout": ("POST", "/api/logout", "public"),
    "add": ("POST", "/api/gallery", "add"), "remove": ("DELETE", "/api/gallery/sources/added1", "remove"),
}
CASE = {"label": "stroma"}  # an addition's form, with a source id of its own per request


def expected(route, credential) -> int:
  need, who = ROUTES[route][2], CREDENTIALS[credential][1]
  if need == "public":
    return 200
  if need == "login":  # the credential is the token in the body: good ones only
    return 200 if credential in ("reader token", "curator token") else 401
  if isinstance(who, int):
    return who
  return 200 if tokens.may(who, need) else 403


def source_for(credential) -> str:
  return "m_" + "".join(c if c.isalnum() else "_" for c in credential)


def send(client, lab, route, credential):
  method, path, need = ROUTES[route]
  made = CREDENTIALS[credential][0](client, lab)
  kwargs = {}
  if route in ("search", "add"):
    kwargs["files"] = {"image": ("q.png", png(), "image/png")}
  if route == "add":
    kwargs["data"] = {**CASE, "source_id": source_for(credential)}
  if route == "remove":  # a case of its own, added by a curator token, for this credential to remove
    added = call(client, "POST", "/api/gallery", headers={"Authorization": f"Bearer {lab['issued']['carl']}"},
                 data={**CASE, "source_id": source_for(credential) + "_r"}, files={"image": ("q.png", png(), "image/png")})
    assert added.status_code == 200, added.text
    path = f"/api/gallery/sources/{source_for(credential)}_r"
  if route == "login":
    return call(client, method, path, json={"token": made.get("token", "")}, headers={"Origin": ORIGIN})
  return call(client, method, path, headers=made.get("headers"), cookie=made.get("cookie"), **kwargs)


@pytest.mark.parametrize("route", list(ROUTES))
def test_route_by_credential_matrix(secured, lab, route):
  got = {credential: send(secured, lab, route, credential) for credential in CREDENTIALS}
  table = {credential: r.status_code for credential, r in got.items()}
  assert table == {credential: expected(route, credential) for credential in CREDENTIALS}, route
  for credential, response in got.items():
    if response.status_code == 401:
      assert response.headers["www-authenticate"].startswith("Bearer") and response.json()["error"]
    if response.status_code == 403:
      assert "curator" in response.json()["error"] or "no role" in response.json()["error"]
  if route == "search":
    assert got["reader token"].json()["generation"] == served_generation(secured)  # 2 + the changes made so far
  if route in ("add", "remove"):  # one audit line per cell, the changes with their source ids and generation
    lines = [json.loads(line) for line in secured.audit.read_text().splitlines()]
    cells = [e for e in lines if e["action"] == route][-len(CREDENTIALS):]
    assert [e["status"] for e in cells] == list(table.values())
    for credential, event in zip(CREDENTIALS, cells):
      if event["status"] == 200:
        answer = got[credential].json()
        assert event["source_ids"] == [answer["source_id"]] and event["generation"] == answer["generation"]
        assert answer["source_id"].startswith(source_for(credential))
  if route == "session":
    assert got["curator session"].json()["user"] == "carl" and got["proxy reader, trusted address"].json()["role"] \
        == "reader" and got["proxy curator, untrusted address"].json()["user"] is None


NO_AUTH = {"none": {}, "a token": {"Authorization": "Bearer whatever"}, "a proxy header": {"X-Forwarded-User": "cora"}}


@pytest.mark.parametrize("credential", list(NO_AUTH))
def test_without_authentication_the_service_is_read_only(lab, credential):
  with TestClient(make_app(lab), base_url=ORIGIN) as client:
    got = {}
    for route, (method, path, need) in ROUTES.items():
      kwargs = {"files": {"image": ("q.png", png(), "image/png")}} if route in ("search", "add") else {}
      got[route] = call(client, method, path, headers=NO_AUTH[credential], data=CASE if route == "add" else None,
                        **kwargs)
    assert {r: g.status_code for r, g in got.items()} == {
        "page": 200, "healthz": 200, "session": 200, "info": 200, "search": 200, "gallery image": 200,
        "reload": 403, "audit": 403, "login": 403, "logout": 200, "add": 403, "remove": 403}
    for route in ("reload", "audit", "login", "add", "remove"):  # each says how to enable the curator routes
      assert "--auth_tokens FILE" in got[route].json()["error"] and "token add" in got[route].json()["error"]
    assert got["session"].json()["auth"] == {"tokens": False, "proxy": False}
    assert got["search"].json()["generation"] == 2


# --- Sessions and CSRF ----------------------------------------------------------------------

def test_session_cookie_attributes_and_logout(secured, lab):
  response = call(secured, "POST", "/api/login", json={"token": lab["issued"]["rita"]}, headers={"Origin": ORIGIN})
  cookie = response.headers["set-cookie"]
  assert "HttpOnly" in cookie and "SameSite=strict" in cookie and f"Max-Age={int(LIFETIME)}" in cookie \
      and "Path=/" in cookie and "Secure" not in cookie
  assert response.json()["user"] == "rita" and response.json()["role"] == "reader"
  value, csrf = response.cookies[sessions.COOKIE], response.json()["csrf_token"]
  assert call(secured, "GET", "/api/gallery/49/image", cookie=value).status_code == 200  # what <img src> does
  assert call(secured, "GET", "/api/session", cookie=value).json()["csrf_token"] == csrf
  refused = call(secured, "POST", "/api/logout", cookie=value)  # no CSRF token: the session stays
  assert refused.status_code == 403 and call(secured, "GET", "/api/info", cookie=value).status_code == 200
  out = call(secured, "POST", "/api/logout", cookie=value, headers={sessions.CSRF_HEADER: csrf, "Origin": ORIGIN})
  assert out.json() == {"logged_out": True} and f'{sessions.COOKIE}=""' in out.headers["set-cookie"]
  assert call(secured, "GET", "/api/info", cookie=value).status_code == 401


@pytest.mark.parametrize("via_proxy", [False, True], ids=["https proxy", "https from an untrusted peer"])
def test_cookie_is_secure_behind_tls(secured, lab, via_proxy):
  peer = PROXY if via_proxy else STRANGER
  response = call(secured, "POST", "/api/login", json={"token": lab["issued"]["rita"]},
                  headers={"x-test-peer": peer, "X-Forwarded-Proto": "https", "Origin": "https://testserver"})
  if via_proxy:  # the proxy terminates TLS and says so
    assert response.status_code == 200 and "Secure" in response.headers["set-cookie"]
  else:  # not believed: the origin the page claims does not match this plain-http request
    assert response.status_code == 403 and "Origin" in response.json()["error"]
  direct = TestClient(secured.app, base_url="https://testserver")
  response = call(direct, "POST", "/api/login", json={"token": lab["issued"]["rita"]})
  assert response.status_code == 200 and "Secure" in response.headers["set-cookie"]


def test_csrf_refused_without_the_header_or_with_a_foreign_origin(secured, lab):
  cookie, csrf = login(secured, lab["issued"]["carl"])
  files = {"image": ("q.png", png(1), "image/png")}
  cases = {
      "no header": {"Origin": ORIGIN},
      "wrong header": {"Origin": ORIGIN, sessions.CSRF_HEADER: csrf[:-2] + "xx"},
      "foreign origin": {"Origin": "https://evil.example", sessions.CSRF_HEADER: csrf},
      "no origin": {sessions.CSRF_HEADER: csrf},
      "origin of another port": {"Origin": "http://testserver:8081", sessions.CSRF_HEADER: csrf},
  }
  add = ("POST", "/api/gallery", {"files": files, "data": {**CASE, "source_id": "csrf_case"}})
  remove = ("DELETE", "/api/gallery/sources/added1", {})
  start = served_generation(secured)
  for what, head in cases.items():
    for method, path, kwargs in (("POST", "/api/reload", {}), ("POST", "/api/search", {"files": files}), add, remove):
      response = call(secured, method, path, headers=head, cookie=cookie, **kwargs)
      assert response.status_code == 403, (what, path, response.text)
      assert "X-CSRF-Token" in response.json()["error"] or "Origin" in response.json()["error"]
  assert served_generation(secured) == start  # nothing was changed
  ok = call(secured, "POST", "/api/reload", headers={"Origin": ORIGIN, sessions.CSRF_HEADER: csrf}, cookie=cookie)
  assert ok.status_code == 200 and ok.json()["generation"] == start
  # The proxy's users ride on the proxy's cookie: the same rule.
  base = {"x-test-peer": PROXY, "X-Forwarded-User": "cora", "Origin": ORIGIN}
  for method, path, kwargs in (("POST", "/api/reload", {}), add, remove):
    assert call(secured, method, path, headers=base, **kwargs).status_code == 403
    assert call(secured, method, path, headers={**base, "Origin": "https://evil.example"}, **kwargs).status_code == 403
  # With the header and this server's Origin, the page's changes go through.
  good = {"Origin": ORIGIN, sessions.CSRF_HEADER: csrf}
  assert call(secured, add[0], add[1], headers=good, cookie=cookie, **add[2]).json()["generation"] == start + 1
  assert call(secured, "DELETE", "/api/gallery/sources/csrf_case", headers=good, cookie=cookie).status_code == 200
  # Bearer clients need neither: no browser adds an Authorization header by itself.
  assert call(secured, "POST", "/api/reload", headers={"Authorization": f"Bearer {lab['issued']['carl']}"}
              ).status_code == 200
  # Logging in from a foreign page is refused too (it would log the browser into another account).
  assert call(secured, "POST", "/api/login", json={"token": lab["issued"]["carl"]},
              headers={"Origin": "https://evil.example"}).status_code == 403


def test_revoking_a_token_ends_its_sessions_at_once(lab, tmp_path):
  token_file = str(tmp_path / "tokens.json")
  token = tokens.add(token_file, "tess", "curator")
  gate = auth.Gate(tokens.TokenStore(token_file))
  with TestClient(make_app(lab, gate), base_url=ORIGIN) as client:
    cookie, _ = login(client, token)
    assert call(client, "GET", "/api/info", cookie=cookie).status_code == 200
    time.sleep(0.01)  # a new mtime for the re-read
    tokens.revoke(token_file, "tess")
    assert call(client, "GET", "/api/info", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    response = call(client, "GET", "/api/info", cookie=cookie)
    assert response.status_code == 401 and "revoked" in response.json()["error"]


# --- Tokens on disk -------------------------------------------------------------------------

def test_token_file_keeps_digests_only_and_the_cli_works(tmp_path):
  token_file = tmp_path / "t.json"
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  cli = [sys.executable, "-m", "histojax.serve", "token"]
  made = subprocess.run(cli + ["add", "--name", "ana", "--role", "curator", "--file", str(token_file)],
                        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
  assert made.returncode == 0, made.stderr
  token = made.stdout.strip()
  assert len(token) >= 43 and "\n" not in token and "shown once" in made.stderr
  text = token_file.read_text()
  assert token not in text and tokens.digest(token) in text
  assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
  entry = json.loads(text)["tokens"][0]
  assert entry["name"] == "ana" and entry["role"] == "curator" and entry["revoked"] is False and entry["created"]
  again = subprocess.run(cli + ["add", "--name", "ana", "--file", str(token_file)], capture_output=True, text=True,
                         timeout=120, env=env, cwd=ROOT)
  assert again.returncode != 0 and "already has an active token named 'ana'" in again.stderr
  revoked = subprocess.run(cli + ["revoke", "--name", "ana", "--file", str(token_file)], capture_output=True,
                           text=True, timeout=120, env=env, cwd=ROOT)
  assert revoked.returncode == 0 and "revoked 1" in revoked.stderr
  listed = subprocess.run(cli + ["list", "--file", str(token_file)], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)
  shown = json.loads(listed.stdout)
  assert shown[0]["revoked"] is True and shown[0]["revoked_at"] and "sha256" not in shown[0]
  assert token not in listed.stdout and tokens.digest(token) not in listed.stdout
  assert tokens.TokenStore(str(token_file)).lookup(token).revoked


def test_lookup_compares_digests_with_hmac_compare_digest(lab, monkeypatch):
  store = tokens.TokenStore(lab["tokens"])
  seen = []
  real = hmac.compare_digest

  def spy(a, b):
    seen.append((a, b))
    return real(a, b)
  monkeypatch.setattr(hmac, "compare_digest", spy)
  token = lab["issued"]["carl"]
  assert store.lookup(token).name == "carl"
  assert seen == [(tokens.digest(token).encode(), tokens.digest(token).encode())]
  monkeypatch.setattr(hmac, "compare_digest", lambda a, b: False)  # its answer decides
  assert store.lookup(token) is None


HOSTILE_TOKEN_FILES = [
    ("not JSON", "{tokens: [", "not valid JSON"),
    ("not an object", "[1, 2]", "expected an object"),
    ("entry not an object", '{"tokens": ["abc"]}', "entry 0: expected an object"),
    ("missing role", '{"tokens": [{"name": "a", "sha256": "' + "a" * 64 + '", "created": "x", "revoked": false}]}',
     "field 'role'"),
    ("unknown role", '{"tokens": [{"name": "a", "role": "admin", "sha256": "' + "a" * 64
     + '", "created": "x", "revoked": false}]}', "role 'admin' is not one of reader, curator"),
    ("a token where the digest goes", '{"tokens": [{"name": "a", "role": "reader", "sha256": "s3cret-token", '
     '"created": "x", "revoked": false}]}', "64 lowercase hex digits"),
    ("revoked not a bool", '{"tokens": [{"name": "a", "role": "reader", "sha256": "' + "a" * 64
     + '", "created": "x", "revoked": "no"}]}', "field 'revoked'"),
    ("same digest twice", '{"tokens": [' + ",".join(['{"name": "a", "role": "reader", "sha256": "' + "b" * 64
                                                     + '", "created": "x", "revoked": false}'] * 2) + "]}",
     "entry 1: the same digest"),
    ("not UTF-8", b"\xff\xfe{", "cannot be read"),
]


@pytest.mark.parametrize("what,content,words", HOSTILE_TOKEN_FILES, ids=[h[0] for h in HOSTILE_TOKEN_FILES])
def test_hostile_token_files_are_refused_by_name(tmp_path, what, content, words):
  path = tmp_path / "tokens.json"
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  os.chmod(path, 0o600)
  with pytest.raises(tokens.TokenFileError, match="tokens.json") as e:
    service.gate(auth_tokens=str(path))
  assert words in str(e.value)


def test_world_writable_or_missing_files_are_refused(tmp_path, lab):
  path = tmp_path / "tokens.json"
  shutil.copy(lab["tokens"], path)
  os.chmod(path, 0o666)
  with pytest.raises(tokens.TokenFileError, match="writable by every user"):
    service.gate(auth_tokens=str(path))
  with pytest.raises(tokens.TokenFileError, match="does not exist; make one with: python -m histojax.serve token add"):
    service.gate(auth_tokens=str(tmp_path / "nope.json"))
  roles = tmp_path / "roles.json"
  roles.write_text('{"pat": "boss"}')
  with pytest.raises(tokens.TokenFileError, match="roles.json, user 'pat': role 'boss'"):
    service.gate(trusted_proxy=[PROXY], proxy_roles=str(roles))
  with pytest.raises(ValueError, match="--trusted_proxy and --proxy_roles go together"):
    service.gate(trusted_proxy=[PROXY])
  with pytest.raises(ValueError, match="--trusted_proxy: .*not-an-address"):
    service.gate(trusted_proxy=["not-an-address"], proxy_roles=lab["roles"])


def test_a_token_file_damaged_while_serving_fails_closed_and_recovers(lab, tmp_path):
  token_file = tmp_path / "tokens.json"
  shutil.copy(lab["tokens"], token_file)
  good = token_file.read_bytes()
  reader = {"Authorization": f"Bearer {lab['issued']['rita']}"}
  with TestClient(make_app(lab, auth.Gate(tokens.TokenStore(str(token_file)))), base_url=ORIGIN) as client:
    assert call(client, "GET", "/api/info", headers=reader).status_code == 200
    token_file.write_text('{"tokens": [')
    broken = call(client, "GET", "/api/info", headers=reader)
    assert broken.status_code == 503 and "token file" in broken.json()["error"]
    assert str(token_file) not in broken.text  # the path is for the operator's log, not the client
    assert call(client, "GET", "/healthz").status_code == 200
    token_file.write_bytes(good)
    os.utime(token_file, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert call(client, "GET", "/api/info", headers=reader).status_code == 200


# --- Audit log ------------------------------------------------------------------------------

def test_audit_log_records_who_did_what_and_never_a_token_or_image(lab, tmp_path):
  log = tmp_path / "audit" / "log.jsonl"
  gate = make_gate(lab, audit_path=str(log))
  image, name = png(7), "patient_4711_slide.png"
  carl, rita = lab["issued"]["carl"], lab["issued"]["rita"]
  with TestClient(with_peer(make_app(lab, gate, index_dir=own_index(tmp_path))), base_url=ORIGIN) as client:
    found = call(client, "POST", "/api/search", headers={"Authorization": f"Bearer {rita}"},
                 files={"image": (name, image, "image/png")})
    assert found.status_code == 200
    call(client, "POST", "/api/login", json={"token": "wrong-" + carl}, headers={"Origin": ORIGIN})
    call(client, "POST", "/api/reload", headers={"Authorization": f"Bearer {rita}"})
    call(client, "GET", "/api/info", headers={"Authorization": f"Bearer {carl[:-1]}"})
    login(client, carl)
    call(client, "GET", "/api/gallery/50/image", headers={"x-test-peer": PROXY, "X-Forwarded-User": "pat",
                                                          "X-Forwarded-For": "198.51.100.1, 192.0.2.7"})
    for who in (rita, carl):  # a reader's attempt to add, then a curator's addition, of the same picture
      call(client, "POST", "/api/gallery", headers={"Authorization": f"Bearer {who}"},
           data={"label": "tumour", "source_id": "case_4711"}, files={"image": (name, image, "image/png")})
    entries = call(client, "GET", "/api/audit", headers={"Authorization": f"Bearer {carl}"}).json()["entries"]
  search, bad_login, reload, bad_token, good_login, picture, refused_add, added = entries
  assert search["user"] == "rita" and search["role"] == "reader" and search["route"] == "/api/search"
  assert search["outcome"] == "ok" and search["status"] == 200 and search["generation"] == 2 and search["time"]
  assert search["query"] == {"sha256": hashlib.sha256(image).hexdigest(), "bytes": len(image)}
  assert search["top"] == {"source_id": "added1", "label": "stroma", "score": 0.9}
  assert (bad_login["route"], bad_login["outcome"], bad_login["status"], bad_login["user"]) == \
      ("/api/login", "unauthenticated", 401, None)
  assert (reload["user"], reload["action"], reload["outcome"], reload["status"]) == ("rita", "reload", "forbidden", 403)
  assert bad_token["outcome"] == "unauthenticated" and good_login["user"] == "carl" and good_login["outcome"] == "ok"
  assert (picture["user"], picture["via"], picture["row"], picture["client"]) == ("pat", "proxy", 50, "192.0.2.7")
  assert (refused_add["user"], refused_add["action"], refused_add["outcome"], refused_add["status"]) == \
      ("rita", "add", "forbidden", 403) and "reader" in refused_add["reason"]
  assert (added["user"], added["outcome"], added["source_ids"], added["label"], added["generation"],
          added["rows_added"], added["retrained"]) == ("carl", "ok", ["case_4711"], "tumour", 3, 1, False)
  assert added["image"] == {"sha256": hashlib.sha256(image).hexdigest(), "bytes": len(image)}
  raw = b"".join(p.read_bytes() for p in log.parent.iterdir())
  for secret in (carl, rita, "wrong-" + carl, carl[:-1], lab["issued"]["rex"]):
    assert secret.encode() not in raw
  assert image not in raw and image[-64:] not in raw and base64.b64encode(image)[:64] not in raw
  assert name.encode() not in raw and b"patient_4711" not in raw  # nor the uploaded file's name


def test_audit_log_rotates_by_size_and_the_route_reads_across_files(lab, tmp_path):
  log = tmp_path / "log.jsonl"
  gate = make_gate(lab, proxy=False)
  gate.audit = audit.AuditLog(str(log), max_bytes=2000, backups=3)
  carl = {"Authorization": f"Bearer {lab['issued']['carl']}"}
  with TestClient(make_app(lab, gate), base_url=ORIGIN) as client:
    for row in range(40):
      assert call(client, "GET", f"/api/gallery/{48 + row % 4}/image", headers=carl).status_code == 200
    got = call(client, "GET", "/api/audit", params={"limit": 15}, headers=carl).json()["entries"]
    denied = call(client, "GET", "/api/audit", params={"limit": "0"}, headers=carl)
  files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("log.jsonl"))
  assert files == ["log.jsonl", "log.jsonl.1", "log.jsonl.2", "log.jsonl.3"]
  for p in tmp_path.glob("log.jsonl*"):
    assert p.stat().st_size <= 2000
    assert all(json.loads(line)["user"] == "carl" for line in p.read_text().splitlines())
  assert [e["row"] for e in got] == [48 + row % 4 for row in range(25, 40)]  # the last 15, oldest first
  assert denied.status_code == 400 and "limit" in denied.json()["error"]


# --- Limits -----------------------------------------------------------------------------------

def test_rate_limit_answers_429_with_retry_after(lab):
  tick = Clock(0.0)
  gate = make_gate(lab, proxy=False, rate_limit_per_min=3, monotonic=tick)
  rita, carl = ({"Authorization": f"Bearer {lab['issued'][n]}"} for n in ("rita", "carl"))
  with TestClient(make_app(lab, gate), base_url=ORIGIN) as client:
    assert [call(client, "GET", "/api/info", headers=rita).status_code for _ in range(3)] == [200] * 3
    slow = call(client, "GET", "/api/info", headers=rita)
    assert slow.status_code == 429 and slow.headers["retry-after"] == "20" and "rate_limit" in slow.json()["error"]
    assert call(client, "GET", "/api/info", headers=carl).status_code == 200  # per user
    tick.now += 20
    assert call(client, "GET", "/api/info", headers=rita).status_code == 200
    # Without a name, the address is the user: guessing tokens is limited as well.
    guesses = [call(client, "GET", "/api/info", headers={"Authorization": f"Bearer guess{i}"}).status_code
               for i in range(5)]
    assert guesses == [401, 401, 401, 429, 429]


def test_concurrent_uploads_over_the_limit_get_429(lab):
  block = threading.Event()
  gate = make_gate(lab, proxy=False, max_concurrent_uploads=1)
  server = Running(make_app(lab, gate, engine=FakeEngine(lab["index"], block), batching=False))
  rita, carl = ({"Authorization": f"Bearer {lab['issued'][n]}"} for n in ("rita", "carl"))

  def search(who):
    return httpx.post(f"{server.url}/api/search", headers=who, files={"image": ("q.png", png(), "image/png")},
                      timeout=60)
  try:
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      first = pool.submit(search, rita)
      deadline = time.time() + 30
      while not gate.uploads._running and time.time() < deadline:
        time.sleep(0.01)
      second = search(rita)  # rita's first is still being answered
      other = pool.submit(search, carl)  # another user is not held back by rita's limit
      time.sleep(0.2)
      block.set()
      assert second.status_code == 429 and second.headers["retry-after"] == "1"
      assert first.result().status_code == 200 and other.result().status_code == 200
    assert search(rita).status_code == 200  # the slot was given back
  finally:
    block.set()
    server.close()


# --- Headers ----------------------------------------------------------------------------------

def test_security_headers_and_a_page_without_inline_script(secured):
  page = call(secured, "GET", "/")
  csp = page.headers["content-security-policy"]
  assert csp == headers.PAGE_CSP and "script-src 'self';" in csp and "unsafe-inline" not in csp
  assert "img-src 'self' blob:;" in csp and "data:" not in csp
  for response in (page, call(secured, "GET", "/api/info"), call(secured, "GET", "/nope"),
                   call(secured, "GET", "/static/app.js"), call(secured, "GET", "/healthz")):
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert "access-control-allow-origin" not in response.headers
  assert call(secured, "GET", "/api/info").headers["content-security-policy"] == headers.OTHER_CSP

  class Inline(html.parser.HTMLParser):
    def __init__(self):
      super().__init__()
      self.found = []

    def handle_starttag(self, tag, attrs):
      for name, value in attrs:
        if name.startswith("on") or name == "style" or (value or "").strip().lower().startswith(("javascript:", "data:")):
          self.found.append((tag, name))
      if tag == "script" and not dict(attrs).get("src"):
        self.found.append((tag, "inline"))

    def handle_data(self, data):
      if self.lasttag == "script" and data.strip():
        self.found.append(("script", "body"))
  parser = Inline()
  parser.feed(page.text)
  assert parser.found == []


def test_without_authentication_only_loopback_host_names_are_answered(lab):
  """A page on another name re-pointed at 127.0.0.1 (DNS rebinding) reads nothing."""
  app = make_app(lab, loopback_hosts_only=True)
  with TestClient(app, base_url="http://127.0.0.1:8080") as client:
    for host in ("127.0.0.1:8080", "localhost:8080", "localhost", "[::1]:8080", "127.0.0.2"):
      assert call(client, "GET", "/api/info", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example:8080", "evil.example", "127.0.0.1.evil.example", "[::1].evil", "", "10.0.0.1:8080"):
      response = call(client, "GET", "/api/gallery/48/image", headers={"Host": host})
      assert response.status_code == 400 and "loopback" in response.json()["error"], host
      assert response.headers["x-content-type-options"] == "nosniff"
  assert headers.host_name("[::1]:8080") == "::1" and headers.host_name("::1") == "::1"


def test_cors_is_closed_unless_configured(lab):
  preflight = {"Origin": "https://viewer.lab", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization"}
  with TestClient(make_app(lab), base_url=ORIGIN) as closed:
    assert "access-control-allow-origin" not in call(closed, "OPTIONS", "/api/search", headers=preflight).headers
    assert "access-control-allow-origin" not in call(closed, "GET", "/api/info", headers={"Origin": "https://x"}).headers
  with TestClient(make_app(lab, cors_origins=["https://viewer.lab"]), base_url=ORIGIN) as opened:
    ok = call(opened, "OPTIONS", "/api/search", headers=preflight)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://viewer.lab"
    assert "access-control-allow-credentials" not in ok.headers  # bearer tokens only, never cookies
    assert "x-content-type-options" in ok.headers
    other = call(opened, "GET", "/api/info", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


# --- Bad requests still get a 4xx, and the server goes on --------------------------------------

BAD_AUTH = [
    ("Basic credentials", "GET", "/api/info", {"headers": {"Authorization": "Basic cml0YTpwdw=="}}, 401),
    ("empty bearer", "GET", "/api/info", {"headers": {"Authorization": "Bearer "}}, 401),
    ("non-ASCII token", "GET", "/api/info", {"headers": {"Authorization": "Bearer t\u00e9st".encode("latin-1")}}, 401),
    ("garbage cookie", "GET", "/api/info", {"cookie": "\x7f" * 10}, 401),
    ("login not JSON", "POST", "/api/login", {"content": b"token=abc"}, 400),
    ("login token not a string", "POST", "/api/login", {"json": {"token": ["a"]}}, 400),
    ("login body too large", "POST", "/api/login", {"content": b"{" + b" " * 5000 + b"}"}, 413),
    ("audit limit not a number", "GET", "/api/audit?limit=1;drop", {"curator": True}, 400),
    ("bad k as a curator", "POST", "/api/search?k=0", {"curator": True, "files": True}, 400),
    ("login with GET", "GET", "/api/login", {}, 405),
]


@pytest.mark.parametrize("what,method,path,how,status", BAD_AUTH, ids=[b[0] for b in BAD_AUTH])
def test_bad_requests_get_a_4xx_and_the_server_goes_on(secured, lab, what, method, path, how, status):
  how = dict(how)
  head = dict(how.pop("headers", {}))
  if how.pop("curator", False):
    head["Authorization"] = f"Bearer {lab['issued']['carl']}"
  if how.pop("files", False):
    how["files"] = {"image": ("q.png", png(), "image/png")}
  response = call(secured, method, path, headers=head, **how)
  assert response.status_code == status, response.text
  assert call(secured, "POST", "/api/search", headers={"Authorization": f"Bearer {lab['issued']['rita']}"},
              files={"image": ("q.png", png(), "image/png")}).status_code == 200


# --- Binding and the real server ----------------------------------------------------------------

def test_without_authentication_only_loopback_is_allowed():
  for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
    assert auth.check_bind(host, authenticated=False, insecure=False) is None
  for host in ("0.0.0.0", "::", "192.168.1.20", "lab-server"):
    with pytest.raises(SystemExit) as e:
      auth.check_bind(host, authenticated=False, insecure=False)
    assert "--auth_tokens" in str(e.value) and "--insecure_no_auth" in str(e.value) and "\n" not in str(e.value)
  assert auth.check_bind("0.0.0.0", authenticated=True, insecure=False) is None
  assert "WARNING --insecure_no_auth" in auth.check_bind("0.0.0.0", authenticated=False, insecure=True)


def test_the_cli_refuses_a_network_host_before_loading_anything(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  done = subprocess.run([sys.executable, "-m", "histojax.serve", "--index", str(tmp_path / "none"), "--host",
                         "0.0.0.0"], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
  assert done.returncode != 0
  assert done.stderr.strip().splitlines()[-1].startswith("histojax.serve: refusing --host 0.0.0.0 without "
                                                         "authentication: give --auth_tokens FILE")


class Running:
  """A uvicorn server configured as `histojax.serve` runs it, on a free port of 127.0.0.1."""

  def __init__(self, app):
    import uvicorn
    self.server = uvicorn.Server(uvicorn.Config(app, **serve.uvicorn_options("127.0.0.1", 0)))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.time() + 60
    while not self.server.started:
      assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
      time.sleep(0.02)
    self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

  def close(self):
    self.server.should_exit = True
    self.thread.join(30)


@pytest.mark.parametrize("trusted", ["127.0.0.1", "10.9.9.9", None],
                         ids=["127.0.0.1 trusted", "another address trusted", "no proxy at all"])
def test_forwarded_headers_are_believed_only_from_the_trusted_proxy(lab, tmp_path, trusted):
  log = tmp_path / "audit.jsonl"
  proxy = auth.Proxy(auth.parse_networks([trusted]), "X-Forwarded-User", tokens.ProxyRoles(lab["roles"])) \
      if trusted else None
  gate = auth.Gate(tokens.TokenStore(lab["tokens"]), proxy, audit.AuditLog(str(log)))
  server = Running(make_app(lab, gate))
  try:
    spoof = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https", "X-Forwarded-User": "cora"}
    response = httpx.get(f"{server.url}/api/info", headers=spoof, timeout=30)
    logged_in = httpx.post(f"{server.url}/api/login", json={"token": lab["issued"]["rita"]},
                           headers={**spoof, "Origin": "https://" + server.url.split("//")[1]}, timeout=30)
  finally:
    server.close()
  event = json.loads(log.read_text().splitlines()[0])
  if trusted == "127.0.0.1":
    assert response.status_code == 200 and (event["user"], event["client"]) == ("cora", "203.0.113.9")
    assert logged_in.status_code == 200 and "Secure" in logged_in.headers["set-cookie"]
  else:  # uvicorn did not rewrite the peer either: the log has the real one, and https is not believed
    assert response.status_code == 401 and (event["user"], event["client"]) == (None, "127.0.0.1")
    assert logged_in.status_code == 403 and "Origin" in logged_in.json()["error"]


# --- The page in Chromium -----------------------------------------------------------------------

def test_the_sign_in_page_in_a_browser(lab, tmp_path):
  if not os.path.exists(CHROMIUM):
    pytest.fail(f"Debian's Chromium is not at {CHROMIUM}: `apt-get install chromium` (.ci/run does)")
  from playwright.sync_api import sync_playwright  # a missing package fails here, loudly
  server = Running(make_app(lab, make_gate(lab, proxy=False)))
  query = tmp_path / "patch.png"
  query.write_bytes(png(3, 96))
  try:
    with sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
      page = browser.new_page()
      problems = []
      page.on("pageerror", lambda e: problems.append(str(e)))
      page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
      page.goto(server.url)
      page.wait_for_selector("#login-form")
      assert page.locator("#app").is_hidden() and page.locator("#account").is_hidden()
      page.fill("#token", "not-a-token")
      page.click("#login-button")
      page.wait_for_selector("#login-error:not([hidden])")
      assert "unknown or revoked token" in page.locator("#login-error").inner_text()
      page.fill("#token", lab["issued"]["rita"])
      page.click("#login-button")
      page.wait_for_selector("#classes input")
      assert page.locator("#who").get_attribute("data-user") == "rita"
      assert "rita (reader)" in page.locator("#who").inner_text()
      assert sessions.COOKIE not in page.evaluate("document.cookie")  # HttpOnly: out of the script's reach
      page.set_input_files("#file", str(query))
      page.wait_for_selector("#thumbs figure img")
      page.wait_for_function("() => [...document.querySelectorAll('#thumbs figure')].every(f => "
                             "f.querySelector('.noimg') || (f.querySelector('img').complete && "
                             "f.querySelector('img').naturalWidth > 0))")
      assert page.locator("#thumbs .noimg").count() == 0  # the pictures came with the cookie
      assert page.locator("#query-image").evaluate("img => img.src.startsWith('blob:') && img.naturalWidth > 0")
      page.screenshot(path=str(tmp_path / "signed_in.png"))
      page.click("#logout")
      page.wait_for_selector("#login-form")
      assert page.evaluate("fetch('/api/info').then(r => r.status)") == 401
      assert not problems, problems
      browser.close()
  finally:
    server.close()
