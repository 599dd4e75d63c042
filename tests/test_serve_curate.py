"""The curator's write routes (POST /api/gallery, DELETE /api/gallery/sources/{id}) on the real
query engine: the compat fixture's quickstart:tiny model over a copy of its grown index
(brute_force, 52 rows, generation 2), served by uvicorn as `histojax.serve` runs it.

What a change does to the searches (the answer's generation, the image found as itself),
the refusals (409 busy or existing id, 422 unknown label, 413, 400), a write that fails
midway, the page in Chromium, and 32 clients searching while a curator adds and removes.
Who may call the routes is tests/test_serve_auth.py's matrix.
"""

import io
import json
import os
import pathlib
import shutil
import time

import httpx
import numpy as np
import PIL.Image
import pytest

from bench import serve_load
from histojax import fileio, query, serve
from histojax.indexing import curator, writer
from histojax.service import audit, auth, tokens
from tests.test_serve_auth import CHROMIUM, Running
from tfds_builders.synthetic_tissue import painter

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPAT = ROOT / "tests" / "fixtures" / "compat"
UPLOAD_LIMIT = 1 << 20
PIXEL_LIMIT = 1_000_000
CLASSES = ["adipose", "stroma", "lymphocytes", "tumour", "gland", "necrosis"]


def png(array) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def painted(cls: int, seed: int, size: int = 128) -> bytes:
  """A synthetic tissue image the gallery has never seen (4 tiles of 64 px at 128 px)."""
  return png(painter.paint_tissue(cls, seed, size))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
  folder = tmp_path_factory.mktemp("curate")
  index_dir = folder / "index"
  shutil.copytree(COMPAT / "indexes" / "grown", index_dir)
  token_file = str(folder / "tokens.json")
  issued = {name: tokens.add(token_file, name, role) for name, role in [("rita", "reader"), ("carl", "curator")]}
  engine = query.QueryEngine.open(str(index_dir), str(COMPAT / "workdir"))
  return {"folder": folder, "index": str(index_dir), "tokens": token_file, "issued": issued, "engine": engine,
          "audit": folder / "audit.jsonl"}


@pytest.fixture(scope="module")
def server(lab):
  gate = auth.Gate(tokens.TokenStore(lab["tokens"]), audit_log=audit.AuditLog(str(lab["audit"])))
  app = serve.build_app(lab["engine"], lab["index"], str(lab["folder"] / "no_tfds"), gate=gate,
                        max_upload_bytes=UPLOAD_LIMIT, max_pixels=PIXEL_LIMIT, batch_wait_ms=5)
  running = Running(app)
  running.app = app
  yield running
  running.close()


def bearer(lab, name):
  return {"Authorization": f"Bearer {lab['issued'][name]}"}


def add(server, lab, data, source_id, label, new_label=None, who="carl", name="case.png", **kwargs):
  fields = {"label": label, "source_id": source_id, **({"new_label": new_label} if new_label is not None else {})}
  return httpx.post(f"{server.url}/api/gallery", headers=bearer(lab, who), data=fields,
                    files={"image": (name, data, "image/png")}, timeout=300, **kwargs)


def remove(server, lab, source_id, who="carl"):
  return httpx.delete(f"{server.url}/api/gallery/sources/{source_id}", headers=bearer(lab, who), timeout=300)


def search(server, lab, data, k=5, who="rita"):
  response = httpx.post(f"{server.url}/api/search", params={"k": k}, headers=bearer(lab, who),
                        files={"image": ("q.png", data, "image/png")}, timeout=300)
  assert response.status_code == 200, response.text
  return response.json()


def generation_on_disk(lab) -> int:
  return json.loads((pathlib.Path(lab["index"]) / "manifest.json").read_text())["growth"]["generation"]


def audit_lines(lab, action=None) -> list[dict]:
  lines = [json.loads(line) for line in lab["audit"].read_text().splitlines()]
  return [e for e in lines if action is None or e["action"] == action]


def found_as_itself(answer, source_id) -> bool:
  """The top source is `source_id` and every tile's first result is one of its patches."""
  return answer["sources"][0]["source_id"] == source_id and all(
      tile["results"][0]["source_id"] == source_id for tile in answer["tiles"])


def mentions(answer, source_id) -> bool:
  return any(s["source_id"] == source_id for s in answer["sources"]) or any(
      r["source_id"] == source_id for tile in answer["tiles"] for r in tile["results"])


# --- Adding and removing, and what searches see --------------------------------------------

def test_a_curator_adds_and_removes_a_case_and_the_next_search_follows(server, lab):
  image = painted(3, 901)
  start = generation_on_disk(lab)
  before = search(server, lab, image)
  assert before["generation"] == start and not mentions(before, "case_901")
  added = add(server, lab, image, "case_901", "tumour")
  assert added.status_code == 200, added.text
  got = added.json()
  assert got == {"source_id": "case_901", "label": "tumour", "new_label": False, "rows_added": 4,
                 "rows_after": lab["engine"].num_rows, "generation": start + 1, "retrained": False,
                 "probe_recall": None}  # brute_force: exact, nothing to probe or retrain
  after = search(server, lab, image)  # the very next search: the new generation, the case found as itself
  assert after["generation"] == start + 1 == generation_on_disk(lab)
  assert found_as_itself(after, "case_901") and after["sources"][0]["label"] == "tumour"
  assert after["sources"][0]["score"] > 0.999
  picture = f"{server.url}/api/gallery/{after['tiles'][0]['results'][0]['gallery_row']}/image"
  shown = httpx.get(picture, params={"generation": after["generation"]}, headers=bearer(lab, "rita"))
  assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"  # from the index itself
  gone = remove(server, lab, "case_901")
  assert gone.status_code == 200, gone.text
  assert gone.json() == {"source_id": "case_901", "rows_removed": 4, "rows_after": lab["engine"].num_rows,
                         "generation": start + 2, "retrained": False}
  again = search(server, lab, image)
  assert again["generation"] == start + 2 and not mentions(again, "case_901")
  # The removal renumbered the rows: the old answer's picture is refused, not another case's shown.
  stale = httpx.get(picture, params={"generation": after["generation"]}, headers=bearer(lab, "rita"))
  assert stale.status_code == 409 and stale.json()["reason"] == "generation" and "search again" in stale.text
  assert httpx.get(picture, params={"generation": "x"}, headers=bearer(lab, "rita")).status_code == 400
  assert [s["source_id"] for s in again["sources"]] == [s["source_id"] for s in before["sources"]]
  adds, removes = audit_lines(lab, "add"), audit_lines(lab, "remove")
  assert {k: adds[-1][k] for k in ("user", "role", "status", "outcome", "source_ids", "label", "generation",
                                   "rows_added", "retrained")} == {
      "user": "carl", "role": "curator", "status": 200, "outcome": "ok", "source_ids": ["case_901"],
      "label": "tumour", "generation": start + 1, "rows_added": 4, "retrained": False}
  assert adds[-1]["image"]["bytes"] == len(image) and len(adds[-1]["image"]["sha256"]) == 64
  assert (removes[-1]["source_ids"], removes[-1]["generation"], removes[-1]["rows_removed"]) == (
      ["case_901"], start + 2, 4)


def test_an_unknown_label_is_422_unless_new_label_is_true(server, lab):
  image = painted(4, 902)
  start = generation_on_disk(lab)
  refused = add(server, lab, image, "case_902", "mucosa")
  assert refused.status_code == 422 and refused.json()["reason"] == "unknown_label"
  assert "'mucosa' is not one of the index's classes" in refused.json()["error"] and "new_label=true" in \
      refused.json()["error"]
  assert generation_on_disk(lab) == start and audit_lines(lab, "add")[-1]["outcome"] == "refused"
  added = add(server, lab, image, "case_902", "mucosa", new_label="true")
  assert added.status_code == 200, added.text
  assert (added.json()["new_label"], added.json()["generation"]) == (True, start + 1)
  info = httpx.get(f"{server.url}/api/info", headers=bearer(lab, "rita")).json()
  assert info["class_names"] == CLASSES + ["mucosa"]
  answer = search(server, lab, image)
  assert found_as_itself(answer, "case_902") and answer["sources"][0]["label"] == "mucosa"
  assert answer["tiles"][0]["results"][0]["label_id"] == len(CLASSES) and "mucosa" in answer["vote"]["votes"]
  # The class is one of the index's now: new_label is no longer needed (and harmless when sent).
  second = add(server, lab, painted(4, 903), "case_903", "mucosa", new_label="on")
  assert second.status_code == 200 and second.json()["new_label"] is False
  for source in ("case_902", "case_903"):
    assert remove(server, lab, source).status_code == 200


def test_a_write_while_another_holds_the_lock_is_409_at_once(server, lab):
  start = generation_on_disk(lab)
  with fileio.folder_lock(lab["index"]):  # as `python -m histojax.index add` in another process holds it
    began = time.perf_counter()
    busy = [add(server, lab, painted(1, 904), "case_904", "stroma"), remove(server, lab, "added1")]
    assert time.perf_counter() - began < 30  # answered, not held until the lock is free
  for response in busy:
    assert response.status_code == 409 and response.json()["reason"] == "busy", response.text
    assert response.headers["retry-after"] == "2" and "try again" in response.json()["error"]
  curation = server.app.state.curation
  assert curation._writing.acquire(blocking=False)  # this server's own write in flight: the same answer
  try:
    assert add(server, lab, painted(1, 904), "case_904", "stroma").json()["reason"] == "busy"
  finally:
    curation._writing.release()
  assert generation_on_disk(lab) == start and [e["status"] for e in audit_lines(lab)[-3:]] == [409, 409, 409]
  assert add(server, lab, painted(1, 904), "case_904", "stroma").status_code == 200  # free again
  assert remove(server, lab, "case_904").status_code == 200


SOURCE_IDS = [("../etc", 400), ("a b", 400), ("-dash", 400), (".hidden", 400), ("x" * 129, 400), ("é", 400),
              ("added1", 409), ("ok_id-1.v2", 200)]


def test_source_ids_are_checked_and_an_existing_one_is_409(server, lab):
  got = {sid: add(server, lab, painted(2, 905), sid, "lymphocytes") for sid, _ in SOURCE_IDS}
  assert {sid: r.status_code for sid, r in got.items()} == dict(SOURCE_IDS)
  assert "not a safe id" in got["a b"].json()["error"]
  assert got["added1"].json()["reason"] == "exists" and "remove it first" in got["added1"].json()["error"]
  assert lab["index"] not in got["added1"].text  # the server's folders are not the client's business
  assert remove(server, lab, "ok_id-1.v2").status_code == 200
  missing = remove(server, lab, "never_added")
  assert missing.status_code == 404 and missing.json()["reason"] == "unknown_source"


def _bad_png() -> bytes:
  return painted(0, 1)[:300]


BAD_ADDS = [  # what, fields over the defaults, the file (name, bytes), status, words
    ("over the upload limit", {}, ("big.png", b"\x89PNG" + b"\0" * (UPLOAD_LIMIT + 10)), 413, "over the limit"),
    ("over the pixel limit", {}, ("wide.png", png(np.zeros((1100, 1000, 3), np.uint8))), 413, "pixels"),
    ("not an image", {}, ("notes.png", b"patient notes, not a picture"), 400, "not"),
    ("truncated", {}, ("cut.png", _bad_png()), 400, "cut.png"),
    ("a whole slide", {}, ("case.svs", b"II*\0" + b"\0" * 64), 400, "whole-slide"),
    ("smaller than the model input", {}, ("tiny.png", png(np.full((32, 32, 3), 200, np.uint8))), 422,
     "smaller than the model input"),
    ("no label", {"label": ""}, None, 400, "label"),
    ("no source id", {"source_id": None}, None, 400, "source_id"),
    ("new_label not a boolean", {"new_label": "maybe"}, None, 400, "new_label"),
    ("label not text", {"label": "a\tb"}, None, 400, "printable"),
]


@pytest.mark.parametrize("what,fields,upload,status,words", BAD_ADDS, ids=[b[0] for b in BAD_ADDS])
def test_bad_additions_get_a_4xx_and_nothing_changes(server, lab, what, fields, upload, status, words):
  start = generation_on_disk(lab)
  form = {k: v for k, v in {"label": "stroma", "source_id": "case_bad", **fields}.items() if v is not None}
  name, data = upload or ("ok.png", painted(1, 906))
  response = httpx.post(f"{server.url}/api/gallery", headers=bearer(lab, "carl"), data=form,
                        files={"image": (name, data, "image/png")}, timeout=300)
  assert response.status_code == status, response.text
  assert words in response.json()["error"]
  assert generation_on_disk(lab) == start
  assert search(server, lab, painted(1, 906))["generation"] == start  # and the server goes on


def test_a_write_that_fails_midway_leaves_the_previous_generation_served(server, lab, monkeypatch):
  """A disk filling up while the next generation is written: 500, the index as it was, searches
  answered from it, and the next add works (growth's crash safety, SIGKILL included, is
  tests/test_growth.py's)."""
  index = pathlib.Path(lab["index"])
  before = {name: (index / name).read_bytes() for name in ("manifest.json", "rows.npz")}
  start = generation_on_disk(lab)
  real_savez = np.savez

  def full(path, **arrays):
    real_savez(path, **arrays)
    raise OSError(28, "No space left on device (simulated)")
  monkeypatch.setattr(writer.np, "savez", full)
  failed = add(server, lab, painted(5, 907), "case_907", "necrosis")
  monkeypatch.undo()
  assert failed.status_code == 500 and failed.json()["reason"] == "write_failed", failed.text
  assert "previous generation is intact" in failed.json()["error"] and "No space" not in failed.text
  assert {name: (index / name).read_bytes() for name in before} == before
  answer = search(server, lab, painted(5, 907))
  assert answer["generation"] == start and not mentions(answer, "case_907")
  logged = audit_lines(lab, "add")[-1]
  assert (logged["status"], logged["outcome"], logged["source_ids"]) == (500, "error", ["case_907"])
  assert add(server, lab, painted(5, 907), "case_907", "necrosis").json()["generation"] == start + 1
  assert remove(server, lab, "case_907").status_code == 200


def test_a_reload_racing_a_swap_reads_one_generation(lab, tmp_path, monkeypatch):
  """A swap landing between the engine's reads of the searcher and of rows.npz: the reload is
  redone, never a searcher of one generation with the rows of another."""
  index_dir = tmp_path / "index"
  shutil.copytree(COMPAT / "indexes" / "grown", index_dir)
  engine = query.QueryEngine(index_dir, lab["engine"].model)
  image = painter.paint_tissue(0, 908, 128)
  curator.add_upload(engine, str(index_dir), "race_1", image, "adipose")
  real_load_rows, swaps = query.indexing.load_rows, []

  def load_rows_after_a_swap(directory):
    if not swaps:
      swaps.append(curator.add_upload(engine, str(index_dir), "race_2", image, "adipose"))
    return real_load_rows(directory)
  monkeypatch.setattr(query.indexing, "load_rows", load_rows_after_a_swap)
  assert engine.reload_if_changed()
  assert swaps and engine.manifest["growth"]["generation"] == swaps[0]["generation"] == 4
  assert engine.num_rows == len(engine.rows["label"]) == 60
  answer = engine.answer("q", image, 5)
  assert {answer["tiles"][i]["results"][0]["source_id"] for i in range(4)} <= {"race_1", "race_2"}


# --- The page, in Chromium ---------------------------------------------------------------------

def sign_in(browser, url, token):
  context = browser.new_context()
  page = context.new_page()
  problems = []
  page.on("pageerror", lambda e: problems.append(str(e)))
  page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
  page.goto(url)
  page.fill("#token", token)
  page.click("#login-button")
  page.wait_for_selector("#classes input")
  page.problems = problems
  return page


def search_on(page, path):
  """The source ids of the page's answer for the image at `path` (the previous answer cleared first)."""
  page.evaluate("() => { document.querySelector('#sources tbody').replaceChildren(); "
                "document.querySelector('#query-line').dataset.generation = ''; }")
  page.set_input_files("#file", str(path))
  page.wait_for_function("() => document.querySelector('#query-line').dataset.generation !== '' "
                         "&& document.querySelector('#sources tbody tr') !== null")
  return [row.get_attribute("data-source") for row in page.locator("#sources tbody tr").all()]


def test_a_curator_adds_from_the_page_and_a_readers_search_finds_it(server, lab, tmp_path):
  if not os.path.exists(CHROMIUM):
    pytest.fail(f"Debian's Chromium is not at {CHROMIUM}: `apt-get install chromium` (.ci/run does)")
  from playwright.sync_api import sync_playwright  # a missing package fails here, loudly
  image = tmp_path / "new_gland.png"
  image.write_bytes(painted(4, 910))
  start = generation_on_disk(lab)
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
    curator_page = sign_in(browser, server.url, lab["issued"]["carl"])
    assert curator_page.locator("#curate").is_visible()
    classes = httpx.get(f"{server.url}/api/info", headers=bearer(lab, "rita")).json()["class_names"]  # + 'mucosa'?
    assert classes[:6] == CLASSES and curator_page.locator("#add-label option").all_inner_texts() == classes + [
        "New label…"]
    curator_page.set_input_files("#add-file", str(image))
    curator_page.select_option("#add-label", "gland")
    curator_page.fill("#add-source", "page_case_910")
    curator_page.click("#add-button")
    curator_page.wait_for_selector("#curate-status[data-outcome]:not([hidden])")
    status = curator_page.locator("#curate-status")
    assert status.get_attribute("data-outcome") == "ok", status.inner_text()
    assert f"generation {start + 1}" in status.inner_text() and "page_case_910" in status.inner_text()
    assert generation_on_disk(lab) == start + 1

    reader_page = sign_in(browser, server.url, lab["issued"]["rita"])
    assert reader_page.locator("#curate").is_hidden() and reader_page.locator("#remove-head").is_hidden()
    found = search_on(reader_page, image)
    assert found[0] == "page_case_910", found
    assert reader_page.locator("#query-line").get_attribute("data-generation") == str(start + 1)
    assert reader_page.locator(".remove-source").count() == 0
    # A reader's page has no form, but the reader may still try, with their own session and CSRF token.
    refused = reader_page.evaluate("""async () => {
      const session = await (await fetch('/api/session')).json();
      const form = new FormData();
      form.append('image', new Blob([new Uint8Array([137, 80, 78, 71])], {type: 'image/png'}), 'x.png');
      form.append('label', 'gland');
      form.append('source_id', 'reader_case');
      const r = await fetch('/api/gallery', {method: 'POST', body: form, headers: {'X-CSRF-Token': session.csrf_token}});
      return [r.status, (await r.json()).error];
    }""")
    assert refused[0] == 403 and "rita is a reader: add needs the curator role" in refused[1]
    attempt = audit_lines(lab, "add")[-1]
    assert (attempt["user"], attempt["via"], attempt["status"], attempt["outcome"]) == ("rita", "session", 403,
                                                                                        "forbidden")
    assert generation_on_disk(lab) == start + 1

    # The curator removes the case from the results table; the reader's next search no longer finds it.
    assert search_on(curator_page, image)[0] == "page_case_910"
    curator_page.once("dialog", lambda dialog: dialog.accept())
    curator_page.click(".remove-source[data-source='page_case_910']")
    curator_page.wait_for_function("() => document.querySelector('#curate-status').textContent.startsWith('Removed')")
    assert f"generation {start + 2}" in status.inner_text()
    assert "page_case_910" not in search_on(reader_page, image)
    curator_page.screenshot(path=os.environ.get("HISTOJAX_SCREENSHOTS", str(tmp_path)) + "/curator.png", full_page=True)
    assert not curator_page.problems and not reader_page.problems, curator_page.problems + reader_page.problems
    browser.close()


# --- Load: searching while the gallery changes -------------------------------------------------

def test_32_clients_keep_searching_while_a_curator_adds_and_removes(server, lab, tmp_path):
  """bench/serve_load.py --curate, small: each of the 5 generations (before, add, remove, add,
  remove) is held until 32 searches, a probe among them, were answered from it; 0 errors, and
  every answer consistent with the generation it reports (bench.serve_load.consistency_problems)."""
  bodies = [serve_load.multipart(p) for p in serve_load.painted_patches(str(tmp_path), 8)]
  port = int(server.url.rsplit(":", 1)[1])
  start = generation_on_disk(lab)
  result = serve_load.curate_load(port, lab["issued"]["rita"], lab["issued"]["carl"], bodies,
                                  serve_load.probe_image(str(tmp_path)), clients=32, pairs=2, min_answers=32, timeout=120)
  assert result["errors"] == 0, result["error_examples"]
  assert result["inconsistent"] == 0, result["inconsistent_examples"]
  assert [c["op"] for c in result["changes"]] == ["add", "remove"] * 2
  assert [c["generation"] for c in result["changes"]] == [start + 1, start + 2, start + 3, start + 4]
  assert sorted(int(g) for g in result["generations_seen"]) == list(range(start, start + 5))
  assert all(n >= 32 for n in result["generations_seen"].values()) and result["probe_searches"] >= 5
  assert result["requests"] == sum(result["generations_seen"].values())


def test_the_consistency_check_catches_inconsistent_answers():
  """The load test's check fails on the answers it exists to catch (it is not vacuous)."""
  first, changes = {"generation": 2, "rows": 52}, [{"op": "add", "generation": 3, "rows_after": 56},
                                                   {"op": "remove", "generation": 4, "rows_after": 52}]
  good = [serve_load.Seen(0, 0, 1, True, 2, 51), serve_load.Seen(0, 1, 2, True, 3, 55, True, True),
          serve_load.Seen(0, 2, 3, False, 4, 51), serve_load.Seen(1, 0, 1, False, 3, 50, True)]
  assert serve_load.consistency_problems(good, first, changes) == []
  bad = {"an unknown generation": serve_load.Seen(0, 0, 1, False, 7, 1),
         "a row past the generation's": serve_load.Seen(0, 0, 1, False, 4, 53),
         "the probe not found where present": serve_load.Seen(0, 0, 1, True, 3, 55, True, False),
         "the probe named where absent": serve_load.Seen(0, 0, 1, False, 2, 10, True),
         "a generation going back": serve_load.Seen(0, 9, 10, False, 2, 1)}
  for what, seen in bad.items():
    extra = [serve_load.Seen(0, 5, 6, False, 3, 1)] if what == "a generation going back" else []
    assert serve_load.consistency_problems(extra + [seen], first, changes), what
