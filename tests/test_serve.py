"""The search service on a tiny trained index (trained once for the module): the API
against the query engine alone, batching, bad input, growing the index while it
serves, and the page in a real browser (Debian's Chromium driven by Playwright).

The browser tests fail, not skip, when Chromium or Playwright is missing: `.ci/run`
installs both. Set HISTOJAX_SCREENSHOTS=DIR to keep a copy of the screenshots.
"""

import concurrent.futures
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import PIL.Image
import pytest

from histojax import query, serve, train
from histojax import index as index_cli
from histojax.data import sources
from tests.conftest import BACH, tiny_config
from tfds_builders.synthetic_tissue import painter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
UPLOAD_LIMIT = 8 << 20  # small, so the 413 test sends little
PIXEL_LIMIT = 4_000_000  # a BACH photo (3.1 MP) passes, a 3000x3000 one does not


class Running:
  """A uvicorn server on a free port of 127.0.0.1, in a thread."""

  def __init__(self, app):
    import uvicorn
    self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.time() + 60
    while not self.server.started:
      assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
      time.sleep(0.05)
    port = self.server.servers[0].sockets[0].getsockname()[1]
    self.url = f"http://127.0.0.1:{port}"

  def close(self):
    self.server.should_exit = True
    self.thread.join(30)


def _png(array) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_dir):
  workdir = tmp_path_factory.mktemp("serve")
  train.train_and_evaluate(tiny_config(tiny_data_dir), workdir)
  served = workdir / "served_index"  # a copy the growth test changes; evaluate's stays as built
  shutil.copytree(workdir / "index", served)
  return workdir, str(served), tiny_data_dir


@pytest.fixture(scope="module")
def engine(trained):
  workdir, served, _ = trained
  return query.QueryEngine.open(served, str(workdir))


@pytest.fixture(scope="module")
def service(trained, engine):
  _, served, data_dir = trained
  running = Running(serve.build_app(engine, served, data_dir, max_upload_bytes=UPLOAD_LIMIT,
                                    max_pixels=PIXEL_LIMIT, batch_wait_ms=50, max_batch=16))
  yield running
  running.close()


def _search(url, data: bytes, name="query.png", k=5, timeout=300):
  return httpx.post(f"{url}/api/search", params={"k": k}, files={"image": (name, data, "image/png")}, timeout=timeout)


def assert_same_answer(got: dict, want: dict):
  """Equal field for field; scores to 1e-5 (batched and lone embeddings may differ in the last bits)."""
  def strip(a):
    return json.loads(json.dumps(a), parse_float=lambda s: round(float(s), 4))
  assert strip(got) == strip(want)


def _queries():
  """Painted images of the tiny dataset's classes: whole 128 px sources and 64 px patches."""
  whole = [(f"{painter.CLASS_NAMES[c]}_{s}.png", painter.paint_tissue(c, s, 128)) for c, s in [(3, 0), (1, 1), (0, 2)]]
  patches = [(f"patch_{c}_{s}.png", painter.paint_tissue(c, s, 64)) for c, s in [(2, 5), (4, 6), (5, 7), (1, 8), (3, 9)]]
  return whole + patches


def test_concurrent_searches_are_batched_and_each_equals_the_engine_alone(service, engine):
  queries = _queries()
  alone = {name: engine.answer(name, image, 5) for name, image in queries}  # the server is idle now
  with concurrent.futures.ThreadPoolExecutor(len(queries)) as pool:
    responses = list(pool.map(lambda q: _search(service.url, _png(q[1]), q[0]), queries))
  for (name, _), response in zip(queries, responses):
    assert response.status_code == 200, response.text
    served = response.json()
    assert served.pop("generation") == 0  # the server's one field more: the index generation it answered from
    assert_same_answer(served, alone[name])
  answer = responses[0].json()
  assert answer["tiles_searched"] == 4 and answer["vote"]["label"] == "tumour" and answer["sources"]
  sizes = httpx.get(f"{service.url}/api/info").json()["batching"]["recent_batch_sizes"]
  assert max(sizes) > 1, sizes  # some requests shared a device call


def test_info_health_and_gallery_pictures(service, trained, engine):
  _, _, data_dir = trained
  info = httpx.get(f"{service.url}/api/info").json()
  assert info["rows"] == engine.num_rows == 48 and info["class_names"] == list(painter.CLASS_NAMES)
  assert info["gallery_images"] == {"available": True, "reason": None} and info["tiling"]["patch_size"] == 64
  assert httpx.get(f"{service.url}/healthz").json()["status"] == "ok"
  response = httpx.get(f"{service.url}/api/gallery/7/image")
  assert response.status_code == 200 and response.headers["content-type"] == "image/png"
  split = sources.open_split(info["dataset"], info["split"], data_dir)
  with PIL.Image.open(io.BytesIO(response.content)) as im:
    np.testing.assert_array_equal(np.asarray(im.convert("RGB")),
                                  np.asarray(PIL.Image.open(io.BytesIO(split[7]["image"])).convert("RGB")))
  page = httpx.get(f"{service.url}/")
  assert page.status_code == 200 and "/static/app.js" in page.text and "http" not in page.text.split("<body>")[1]


def _truncated_png() -> bytes:
  return _png(painter.paint_tissue(1, 0, 128))[:400]


class _Raw:
  def __init__(self, status, body):
    self.status_code, self.text = status, body

  def json(self):
    return json.loads(self.text)


def _raw_get(url, path):
  """GET with the path sent byte for byte (HTTP clients remove '..' segments first)."""
  import socket
  host, port = url.split("//")[1].split(":")
  with socket.create_connection((host, int(port)), timeout=30) as s:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
      data += chunk
  head, _, body = data.partition(b"\r\n\r\n")
  return _Raw(int(head.split()[1]), body.decode())


BAD = [  # (what, request kwargs for httpx or a callable, status, words in the message)
    ("not an image", lambda u: _search(u, b"%PDF-1.4 definitely not pixels", "notes.pdf"), 400, "notes.pdf: not a"),
    ("empty file", lambda u: _search(u, b"", "empty.png"), 400, "is empty"),
    ("truncated PNG", lambda u: _search(u, _truncated_png(), "cut.png"), 400, "cut.png"),
    ("smaller than the model input", lambda u: _search(u, _png(np.full((20, 30, 3), 200, np.uint8))), 422,
     "smaller than the model input"),
    ("over the upload limit", lambda u: _search(u, os.urandom(UPLOAD_LIMIT + 1024), "big.png"), 413, "limit"),
    ("over the pixel limit", lambda u: _search(u, _png(np.full((3000, 3000, 3), 230, np.uint8))), 413, "limit"),
    ("no image field", lambda u: httpx.post(f"{u}/api/search", files={"file": ("a.png", b"x")}), 400, "'image'"),
    ("bad k", lambda u: _search(u, _png(painter.paint_tissue(1, 0, 64)), k="1;drop"), 400, "k must be"),
    ("row out of range", lambda u: httpx.get(f"{u}/api/gallery/48/image"), 404, "out of range"),
    ("row not a number", lambda u: httpx.get(f"{u}/api/gallery/-1/image"), 400, "non-negative integer"),
    ("path traversal", lambda u: httpx.get(f"{u}/api/gallery/..%2F..%2F..%2Fetc%2Fpasswd/image"), 400,
     "no such gallery resource"),
    ("path traversal, raw", lambda u: _raw_get(u, "/api/gallery/../../../etc/passwd"), 400, "no such gallery resource"),
]


@pytest.mark.parametrize("what,send,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx_and_the_server_goes_on(service, what, send, status, words):
  response = send(service.url)
  assert response.status_code == status, (what, response.text[:300])
  assert words in response.json()["error"], response.json()
  assert "root:" not in response.text
  ok = _search(service.url, _png(painter.paint_tissue(2, 3, 64)), "after.png")
  assert ok.status_code == 200 and ok.json()["tiles_searched"] == 1


def test_index_add_then_remove_is_served_without_a_restart(service, trained, engine, tmp_path):
  workdir, served, _ = trained
  tree = tmp_path / "new_cases"
  (tree / "necrosis").mkdir(parents=True)
  new = painter.paint_tissue(5, 4242, 128)  # a source the gallery does not have
  PIL.Image.fromarray(new).save(tree / "necrosis" / "case_4242.png")
  # What `index add` runs after parsing its flags (in-process: the CLI's own process would
  # load JAX and the model again); `remove` below goes through the CLI.
  summary = index_cli.run_add(served, [str(tree)], workdir=str(workdir))
  assert summary["rows_before"] == 48 and summary["rows_added"] == 4 and summary["rows_after"] == 52
  # Reload is a curator route, and this server runs without authentication (read-only): 403,
  # saying how to enable it. The worker still picks the change up by itself within a second.
  refused = httpx.post(f"{service.url}/api/reload")
  assert refused.status_code == 403 and "--auth_tokens" in refused.json()["error"]
  time.sleep(1.1)
  answer = _search(service.url, _png(new), "again.png").json()
  assert answer["generation"] == 1 and httpx.get(f"{service.url}/api/info").json()["rows"] == 52
  for tile in answer["tiles"]:  # each tile finds itself, now a gallery row of the new case
    top = tile["results"][0]
    assert (top["source_id"], top["label"], top["coords"]) == ("case_4242", "necrosis", [tile["y"], tile["x"]])
    assert top["gallery_row"] >= 48 and top["score"] == pytest.approx(1.0, abs=1e-4)
  picture = httpx.get(f"{service.url}/api/gallery/{answer['tiles'][0]['results'][0]['gallery_row']}/image")
  assert picture.status_code == 200
  with PIL.Image.open(io.BytesIO(picture.content)) as im:  # the model-input crop of that tile
    assert im.size == (engine.image_size, engine.image_size)
  cli = [sys.executable, "-m", "histojax.index", "remove", "--index", served]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  wrong = subprocess.run(cli + ["--source", "case_9999"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert wrong.returncode == 2 and "no row of the index" in wrong.stderr and "case_9999" in wrong.stderr
  done = subprocess.run(cli + ["--source", "case_4242"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert json.loads(done.stdout)["rows_removed"] == 4
  time.sleep(1.1)  # the worker looks at the index at most once a second; the next search sees it
  after = _search(service.url, _png(new), "gone.png").json()
  assert all(r["source_id"] != "case_4242" for t in after["tiles"] for r in t["results"])
  assert httpx.get(f"{service.url}/api/info").json()["rows"] == 48


# --- In a real browser -------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
  if not os.path.exists(CHROMIUM):
    pytest.fail(f"Debian's Chromium is not at {CHROMIUM}: `apt-get install chromium` (.ci/run does); "
                "the browser tests need it and are not skipped")
  from playwright.sync_api import sync_playwright  # a missing package fails here, loudly
  with sync_playwright() as p:
    chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield chromium
    chromium.close()


def _keep(path: pathlib.Path):
  extra = os.environ.get("HISTOJAX_SCREENSHOTS")
  if extra:
    os.makedirs(extra, exist_ok=True)
    shutil.copy(path, os.path.join(extra, path.name))


def _page_shows(page, answer: dict):
  """What the page shows agrees with the API's answer for the same file."""
  page.wait_for_selector("#thumbs figure img")
  vote = page.locator("#vote")
  assert vote.get_attribute("data-label") == answer["vote"]["label"]
  assert float(vote.get_attribute("data-fraction")) == pytest.approx(answer["vote"]["fraction"])
  assert page.locator(".tile").count() == answer["tiles_searched"]
  first = page.locator("#sources tbody tr").first.get_attribute("data-source")
  assert first == answer["sources"][0]["source_id"]
  page.locator(".tile").first.click()  # one tile: its own top k, in order
  rows = [int(r) for r in page.locator("#thumbs figure").evaluate_all("fs => fs.map(f => f.dataset.row)")]
  assert rows == [r["gallery_row"] for r in answer["tiles"][0]["results"]]
  # Every thumbnail settles (loaded, or replaced by "picture unavailable" on an error); none failed.
  page.wait_for_function("() => [...document.querySelectorAll('#thumbs figure')].every(f => "
                         "f.querySelector('.noimg') || (f.querySelector('img').complete && "
                         "f.querySelector('img').naturalWidth > 0))")
  assert page.locator("#thumbs .noimg").count() == 0


def _queries_for_the_page(tmp_path):
  patch = tmp_path / "patch_lymphocytes.png"
  PIL.Image.fromarray(painter.paint_tissue(2, 77, 64)).save(patch)
  photos = sorted((BACH / "ICIAR2018_BACH_Challenge" / "Photos" / "InSitu").glob("is0*.*")) if BACH else []
  if photos:
    return [photos[0], patch]
  synthetic = tmp_path / "photo_tumour.png"  # no BACH photos given: a large synthetic image
  PIL.Image.fromarray(painter.paint_tissue(3, 78, 512)).save(synthetic)
  return [synthetic, patch]


def test_the_page_in_a_browser(service, browser, tmp_path):
  page = browser.new_page(viewport={"width": 1400, "height": 1000})
  errors = []
  page.on("pageerror", lambda e: errors.append(str(e)))
  page.goto(service.url)
  page.wait_for_selector("#classes input")
  assert page.locator("#classes input").count() == 6 and page.locator("#gallery-warning").is_hidden()
  for path in _queries_for_the_page(tmp_path):
    answer = _search(service.url, path.read_bytes(), path.name, k=10).json()
    page.set_input_files("#file", str(path))
    page.wait_for_function("n => document.querySelector('#query-line').textContent.startsWith(n)", arg=path.name)
    _page_shows(page, answer)
    shot = tmp_path / f"page_{path.stem}.png"
    page.screenshot(path=str(shot), full_page=True)
    _keep(shot)
  # The class filter by keyboard: Tab to the first class, Space unticks it, its thumbnails go.
  page.locator("#whole").click()
  label = page.locator("#thumbs figure").first.get_attribute("data-label")
  box = page.locator(f"#classes input[data-label-id='{list(painter.CLASS_NAMES).index(label)}']")
  box.focus()
  page.keyboard.press("Space")
  assert not box.is_checked()
  assert page.locator(f"#thumbs figure[data-label='{label}']").count() == 0
  assert not errors, errors


def test_the_page_says_when_gallery_pictures_are_unreachable(trained, engine, browser, tmp_path):
  _, served, _ = trained
  running = Running(serve.build_app(engine, served, str(tmp_path / "no_tfds_here")))
  try:
    info = httpx.get(f"{running.url}/api/info").json()
    assert info["gallery_images"]["available"] is False and "cannot be opened" in info["gallery_images"]["reason"]
    response = httpx.get(f"{running.url}/api/gallery/0/image")
    assert response.status_code == 503 and "cannot be opened" in response.json()["error"]
    page = browser.new_page()
    page.goto(running.url)
    page.wait_for_selector("#gallery-warning:not([hidden])")
    assert "not available" in page.locator("#gallery-warning").inner_text()
    patch = tmp_path / "p.png"
    PIL.Image.fromarray(painter.paint_tissue(4, 1, 64)).save(patch)
    page.set_input_files("#file", str(patch))
    page.wait_for_selector("#thumbs .noimg")  # results still listed, pictures marked unavailable
    assert page.locator("#vote").get_attribute("data-label")
  finally:
    running.close()
