// The search page: one image in, its tiles coloured by their vote, the neighbours of the
// selected tile (or of the whole image) and the top source images. No framework, no CDN, no
// inline script or handler (the Content-Security-Policy forbids them): everything is wired here.
"use strict";

// Okabe-Ito: told apart with the common colour-vision deficiencies; more classes get hues.
const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#8C6D00", "#000000"];
const state = { info: null, answer: null, selected: null, shown: new Set(), objectUrl: null, session: null, csrf: null,
  may: [], file: null };
const NEW_LABEL = "\u0000new";  // the label menu's "new label" entry (no class name holds a NUL)
const $ = (id) => document.getElementById(id);

function colour(labelId) {
  return labelId < PALETTE.length ? PALETTE[labelId] : `hsl(${(labelId * 137) % 360} 60% 42%)`;
}

function textOn(hex) {  // black or white text, whichever reads on the colour
  if (!hex.startsWith("#")) return "#fff";
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16) / 255);
  return 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.55 ? "#000" : "#fff";
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "style") {
      for (const [name, v] of Object.entries(value)) {
        if (name.startsWith("--")) node.style.setProperty(name, v); else node.style[name] = v;
      }
    }
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// --- Signing in ----------------------------------------------------------------------
// A server with tokens asks for one once (POST /api/login) and answers with an HttpOnly
// session cookie, which every later request (thumbnails included) carries, and a CSRF token,
// which the page sends with every POST. Behind a proxy the proxy signs people in.

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.csrf && (options.method || "GET") !== "GET") headers.set("X-CSRF-Token", state.csrf);
  const response = await fetch(path, { ...options, headers, credentials: "same-origin" });
  if (response.status === 401 && needsSignIn()) showLogin("Your session has ended: sign in again.");
  return response;
}

function needsSignIn() {
  const auth = state.session?.auth;
  return Boolean(auth && (auth.tokens || auth.proxy));
}

async function start() {
  state.session = await (await fetch("/api/session", { credentials: "same-origin" })).json();
  if (needsSignIn() && !state.session.user) { showLogin(""); return; }
  await signedIn(state.session);
}

function showLogin(message) {
  state.csrf = null;
  showCuratorControls([]);
  $("app").hidden = true;
  $("account").hidden = true;
  $("login").hidden = false;
  const tokens = state.session.auth.tokens;
  $("login-form").hidden = !tokens;
  $("login-help").textContent = tokens ? "This server asks for an access token; your lab's administrator gives you one."
    : "This server signs people in through the lab's proxy, and it does not know you (yet): ask its administrator.";
  $("login-error").textContent = message;
  $("login-error").hidden = !message;
  if (tokens) $("token").focus();
}

async function signedIn(who) {
  state.csrf = who.csrf_token;
  $("login").hidden = true;
  $("app").hidden = false;
  $("account").hidden = !who.user || who.via === "none";
  $("who").textContent = who.user ? `signed in as ${who.user} (${who.role})` : "";
  $("who").dataset.user = who.user || "";
  $("who").dataset.role = who.role || "";
  $("logout").hidden = who.via !== "session";
  showCuratorControls(who.may || []);
  if (!state.info) await loadInfo();
}

function may(action) {
  return state.may.includes(action);
}

function showCuratorControls(actions) {  // the server decides; this only spares readers controls they may not use
  state.may = actions;
  $("curate").hidden = !may("add");
  $("remove-head").hidden = !may("remove");
  if (state.answer) redraw();
}

async function signIn(event) {
  event.preventDefault();
  $("login-button").disabled = true;
  try {
    const response = await fetch("/api/login", { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token: $("token").value.trim() }) });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `sign-in failed (${response.status})`);
    $("token").value = "";
    await signedIn({ ...answer, via: "session", csrf_token: answer.csrf_token });
  } catch (e) {
    $("login-error").textContent = e.message;
    $("login-error").hidden = false;
  } finally {
    $("login-button").disabled = false;
  }
}

async function signOut() {
  await api("/api/logout", { method: "POST" }).catch(() => {});
  state.answer = null;
  $("summary").hidden = true;
  $("thumbs").replaceChildren();
  $("sources").tBodies[0].replaceChildren();
  document.dispatchEvent(new CustomEvent("histojax:answer", { detail: null }));
  showLogin("Signed out.");
}

// --- The index ---------------------------------------------------------------------

async function loadInfo() {
  const response = await api("/api/info");
  if (!response.ok) throw new Error(`${response.status}`);
  state.info = await response.json();
  const info = state.info;
  $("index-info").textContent = `${info.rows.toLocaleString()} gallery patches of ${info.dataset} (${info.split}), `
    + `${info.class_names.length} classes, ${info.mode} search, model ${info.model?.name ?? "?"} `
    + `(step ${info.checkpoint?.step ?? "?"}), generation ${info.growth?.generation ?? 0}`;
  if (!info.gallery_images.available) {
    $("gallery-warning").textContent = "Gallery pictures are not available, so results are shown without "
      + `them: ${info.gallery_images.reason}`;
    $("gallery-warning").hidden = false;
  }
  info.class_names.forEach((_, i) => state.shown.add(i));
  drawFilter();
  $("add-label").replaceChildren(...info.class_names.map((name) => el("option", { value: name }, name)),
    el("option", { value: NEW_LABEL }, "New label…"));
  showNewLabel();
}

function voteCounts() {  // tiles voting for each class
  const counts = new Array(state.info.class_names.length).fill(0);
  if (state.answer) for (const tile of state.answer.tiles) if (tile.vote >= 0) counts[tile.vote] += 1;
  return counts;
}

function drawFilter() {
  const counts = voteCounts();
  const box = $("classes");
  box.replaceChildren(...state.info.class_names.map((name, i) => {
    const input = el("input", { type: "checkbox", checked: state.shown.has(i), dataset: { labelId: i },
      onchange: (e) => { e.target.checked ? state.shown.add(i) : state.shown.delete(i); redraw(); } });
    return el("label", { className: "cls", style: { "--c": colour(i) } }, input, el("span", { className: "swatch" }),
      name, el("span", { className: "count" }, state.answer ? `${counts[i]} tile${counts[i] === 1 ? "" : "s"}` : ""));
  }));
}

// --- Searching ---------------------------------------------------------------------

async function search(file) {
  showError("");
  $("busy").hidden = false;
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const response = await api(`/api/search?k=${$("k").value}`, { method: "POST", body: form });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `search failed (${response.status})`);
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = URL.createObjectURL(file);
    for (const tile of answer.tiles) tile.vote = tileVote(tile.results);
    state.answer = answer;
    state.file = file;
    state.selected = null;
    $("query-image").src = state.objectUrl;
    $("summary").hidden = false;
    await $("query-image").decode().catch(() => {});
    fitImage();
    drawAnswer();
  } catch (e) {
    showError(e.message);
  } finally {
    $("busy").hidden = true;
  }
}

function tileVote(results) {  // majority of the tile's top k; a tie goes to the best-ranked label
  const counts = new Map();
  for (const r of results) counts.set(r.label_id, (counts.get(r.label_id) || 0) + 1);
  let best = -1, most = 0;
  for (const r of results) if (counts.get(r.label_id) > most) { best = r.label_id; most = counts.get(r.label_id); }
  return best;
}

// --- Drawing -----------------------------------------------------------------------

function drawAnswer() {
  const a = state.answer;
  $("query-line").textContent = `${a.query}: ${a.width}×${a.height} px, ${a.tiles_searched} tile(s) searched, `
    + `${a.tiles_dropped} dropped as background; gallery generation ${a.generation ?? "?"}`;
  $("query-line").dataset.generation = a.generation ?? "";
  const vote = $("vote");
  if (a.vote) {
    vote.replaceChildren(el("span", { className: "chip", style: { "--c": colour(a.vote.label_id),
      color: textOn(colour(a.vote.label_id)) } }, a.vote.label), ` ${Math.round(a.vote.fraction * 100)}% of the votes`);
    vote.dataset.label = a.vote.label;
    vote.dataset.fraction = a.vote.fraction;
  } else {
    vote.textContent = "no tissue tile, no vote";
    vote.dataset.label = "";
  }
  const total = a.vote ? Object.values(a.vote.votes).reduce((s, v) => s + v, 0) : 0;
  $("vote-bars").replaceChildren(...state.info.class_names.map((name, i) => {
    const n = (a.vote && a.vote.votes[name]) || 0;
    const pct = total ? (100 * n) / total : 0;
    return el("div", { className: "bar", style: { "--c": colour(i) }, dataset: { label: name, votes: n } },
      el("span", {}, name), el("span", { className: "track" }, el("span", { className: "fill", style: { width: `${pct}%` } })),
      el("span", { className: "pct" }, `${pct.toFixed(0)}%`));
  }));
  drawTiles();
  drawFilter();
  redraw();
  document.dispatchEvent(new CustomEvent("histojax:answer", { detail: a }));  // slides.js draws the top slides
}

function fitImage() {  // as wide as the column allows, at most 62% of the window's height
  const a = state.answer, column = $("query").clientWidth - 2;
  const width = Math.min(column, (0.62 * window.innerHeight * a.width) / a.height);
  $("query-image").style.width = `${Math.floor(width)}px`;
}

function drawTiles() {
  const a = state.answer, img = $("query-image");
  const scale = img.clientWidth / (a.width * (a.tiling.resize || 1));
  const whole = a.tiles.length === 1 && a.tiles[0].tissue_fraction === null;  // taken whole, not tiled
  $("tiles").replaceChildren(...a.tiles.map((tile, i) => {
    const size = a.tiling.patch_size * scale;
    const box = whole ? { left: "0", top: "0", width: "100%", height: "100%" }
      : { left: `${tile.x * scale}px`, top: `${tile.y * scale}px`, width: `${size}px`, height: `${size}px` };
    const name = tile.vote >= 0 ? state.info.class_names[tile.vote] : "no result";
    return el("button", { type: "button", className: "tile", tabIndex: i === 0 ? 0 : -1, dataset: { index: i },
      style: { ...box, "--c": tile.vote >= 0 ? colour(tile.vote) : "#888", "--bw": `${Math.max(1, Math.min(3, Math.round(size / 14)))}px` },
      title: `tile (${tile.y}, ${tile.x}): ${name}`, "aria-label": `tile at y ${tile.y}, x ${tile.x}, voted ${name}`,
      onclick: () => select(i), onkeydown: (e) => moveFocus(e, i) });
  }));
}

function select(i) {
  state.selected = i === state.selected ? null : i;
  redraw();
}

function moveFocus(event, i) {  // arrow keys walk the grid; Escape goes back to the whole image
  const tiles = state.answer.tiles, here = tiles[i];
  if (event.key === "Escape") { state.selected = null; redraw(); return; }
  const dirs = { ArrowRight: [0, 1], ArrowLeft: [0, -1], ArrowDown: [1, 0], ArrowUp: [-1, 0] };
  if (!(event.key in dirs)) return;
  event.preventDefault();
  const [dy, dx] = dirs[event.key];
  let best = -1, bestDist = Infinity;
  tiles.forEach((t, j) => {
    const along = dy ? (t.y - here.y) * dy : (t.x - here.x) * dx;
    const across = dy ? Math.abs(t.x - here.x) : Math.abs(t.y - here.y);
    if (along > 0 && along + 2 * across < bestDist) { best = j; bestDist = along + 2 * across; }
  });
  if (best >= 0) { state.selected = best; redraw(); focusTile(best); }
}

function focusTile(i) {
  for (const node of $("tiles").children) node.tabIndex = Number(node.dataset.index) === i ? 0 : -1;
  $("tiles").children[i].focus();
}

function neighbours() {  // the selected tile's results, or the best of all tiles' (one per gallery row)
  const a = state.answer, k = Number($("k").value);
  if (state.selected !== null) return a.tiles[state.selected].results;
  const best = new Map();
  for (const tile of a.tiles) for (const r of tile.results) {
    const seen = best.get(r.gallery_row);
    if (!seen || r.score > seen.score) best.set(r.gallery_row, r);
  }
  return [...best.values()].sort((p, q) => q.score - p.score || p.gallery_row - q.gallery_row).slice(0, k);
}

function tileSources(results) {  // the selected tile's source images: summed score of their patches
  const pooled = new Map();
  for (const r of results) {
    const s = pooled.get(r.source_id) || { source_id: r.source_id, label: r.label, label_id: r.label_id, score: 0, tiles_matched: 0 };
    s.score += r.score; s.tiles_matched += 1; pooled.set(r.source_id, s);
  }
  return [...pooled.values()].sort((p, q) => q.score - p.score).map((s, i) => ({ ...s, rank: i + 1 }));
}

function redraw() {
  if (!state.answer) return;
  const a = state.answer, sel = state.selected;
  for (const node of $("tiles").children) {
    const tile = a.tiles[Number(node.dataset.index)];
    node.classList.toggle("selected", Number(node.dataset.index) === sel);
    node.classList.toggle("faded", tile.vote >= 0 && !state.shown.has(tile.vote));
  }
  $("whole").setAttribute("aria-pressed", String(sel === null));
  const scope = sel === null ? "(whole image)" : `(tile y ${a.tiles[sel].y}, x ${a.tiles[sel].x})`;
  $("scope").textContent = scope;
  $("sources-scope").textContent = scope;
  const shown = neighbours().filter((r) => state.shown.has(r.label_id));
  $("thumbs").replaceChildren(...shown.map((r) => el("figure", { className: "thumb", style: { "--c": colour(r.label_id) },
      dataset: { row: r.gallery_row, label: r.label } },
    // Rows added to the index carry their own picture even when the dataset is unreachable.
    // With the answer's generation: once a change renumbers the rows, the server refuses rather than show another case.
    el("img", { src: `/api/gallery/${r.gallery_row}/image${a.generation === undefined ? "" : `?generation=${a.generation}`}`,
      alt: `gallery patch ${r.gallery_row}, ${r.label}`,
      onerror: (e) => e.target.replaceWith(el("div", { className: "noimg" }, "picture unavailable")) }),
    el("figcaption", {}, el("div", { className: "label" }, r.label),
      el("div", { className: "meta" }, `score ${r.score.toFixed(3)}`),
      el("div", { className: "meta" }, `${r.source_id} (${r.coords.join(", ")})`)))));
  if (!shown.length) $("thumbs").replaceChildren(el("p", { className: "muted" }, "no result of the classes shown"));
  const sources = (sel === null ? a.sources || [] : tileSources(a.tiles[sel].results)).filter((s) => state.shown.has(s.label_id));
  $("sources").tBodies[0].replaceChildren(...sources.map((s) => el("tr", { dataset: { source: s.source_id } },
    el("td", { className: "num" }, String(s.rank)), el("td", {}, s.source_id),
    el("td", {}, el("span", { className: "chip", style: { "--c": colour(s.label_id), color: textOn(colour(s.label_id)) } }, s.label)),
    el("td", { className: "num" }, s.score.toFixed(3)), el("td", { className: "num" }, String(s.tiles_matched)),
    ...(may("remove") ? [el("td", {}, el("button", { type: "button", className: "remove-source",
      dataset: { source: s.source_id }, "aria-label": `remove ${s.source_id} from the gallery`,
      onclick: () => removeSource(s.source_id) }, "Remove"))] : []))));
}

// --- Curating (curators only: the server refuses everyone else) ----------------------

function curateStatus(message, failed = false) {
  const box = $("curate-status");
  box.textContent = message;
  box.className = failed ? "error" : "status-ok";
  box.dataset.outcome = failed ? "refused" : "ok";
  box.hidden = !message;
}

function showNewLabel() {
  const fresh = $("add-label").value === NEW_LABEL;
  $("add-new-label").hidden = !fresh;
  $("add-new-label-title").hidden = !fresh;
  $("add-new-label").required = fresh;
}

async function addCase(event) {
  event.preventDefault();
  const file = $("add-file").files[0];
  const fresh = $("add-label").value === NEW_LABEL;
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("label", fresh ? $("add-new-label").value.trim() : $("add-label").value);
  form.append("source_id", $("add-source").value.trim());
  if (fresh) form.append("new_label", "true");
  $("add-button").disabled = true;
  curateStatus("");
  try {
    const response = await api("/api/gallery", { method: "POST", body: form });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `adding failed (${response.status})`);
    curateStatus(`Added ${answer.source_id} as ${answer.label}${answer.new_label ? " (a new class)" : ""}: `
      + `${answer.rows_added} patches, gallery generation ${answer.generation}`
      + `${answer.retrained ? " (the searcher was retrained)" : ""}.`);
    $("add-form").reset();
    await afterChange();
  } catch (e) {
    curateStatus(e.message, true);
  } finally {
    $("add-button").disabled = false;
  }
}

async function removeSource(sourceId) {
  if (!window.confirm(`Remove every patch of ${sourceId} from the gallery?`)) return;
  try {
    const response = await api(`/api/gallery/sources/${encodeURIComponent(sourceId)}`, { method: "DELETE" });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `removing failed (${response.status})`);
    curateStatus(`Removed ${answer.source_id}: ${answer.rows_removed} patches, gallery generation ${answer.generation}.`);
    await afterChange();
  } catch (e) {
    curateStatus(e.message, true);
  }
}

async function afterChange() {  // the gallery changed: its summary and classes, and the shown answer, again
  await loadInfo();
  if (state.file) await search(state.file);
}

// --- Wiring ------------------------------------------------------------------------

// The input is emptied after each pick, so picking the same file again (after the gallery changed) searches again.
$("file").addEventListener("change", (e) => { if (e.target.files.length) { search(e.target.files[0]); e.target.value = ""; } });
$("whole").addEventListener("click", () => { state.selected = null; redraw(); });
$("k").addEventListener("change", () => { if (state.file) search(state.file); });
const drop = $("drop");
for (const type of ["dragenter", "dragover"]) drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); if (e.dataTransfer.files.length) search(e.dataTransfer.files[0]); });
window.addEventListener("resize", () => { if (state.answer) { fitImage(); drawTiles(); redraw(); } });
$("login-form").addEventListener("submit", signIn);
$("add-form").addEventListener("submit", addCase);
$("add-label").addEventListener("change", showNewLabel);
$("logout").addEventListener("click", signOut);
start().catch((e) => showError(`cannot read /api/info: ${e.message}`));
