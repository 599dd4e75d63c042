// Result slides: a thumbnail per top slide with its matched regions outlined, and a zoomable view
// of the slide (OpenSeadragon, vendored, over the service's Deep Zoom tiles) centred on a region.
// app.js announces each answer with a "histojax:answer" event; this file draws answer.slides.
// Regions and slide sizes are level-0 pixels, which the Deep Zoom image's pixels are too.
"use strict";

(() => {
  const byId = (id) => document.getElementById(id);
  const infos = new Map();  // slide id -> promise of /api/slides/<id>/info
  let viewer = null;

  function slideUrl(id, rest) {
    return `/api/slides/${encodeURIComponent(id)}/${rest}`;
  }

  function slideInfo(id) {
    if (!infos.has(id)) {
      infos.set(id, fetch(slideUrl(id, "info"), { credentials: "same-origin" }).then(async (response) => {
        const body = await response.json();
        if (!response.ok) throw new Error(body.error || `slide ${id}: ${response.status}`);
        return body;
      }));
      infos.get(id).catch(() => infos.delete(id));  // a failure is asked again next time
    }
    return infos.get(id);
  }

  function node(tag, props = {}, ...children) {
    const made = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "dataset") Object.assign(made.dataset, value);
      else if (key.startsWith("on")) made.addEventListener(key.slice(2), value);
      else if (key in made) made[key] = value;
      else made.setAttribute(key, value);
    }
    made.append(...children);
    return made;
  }

  function labelColour(labelId) {  // app.js's palette, so classes look the same everywhere
    return typeof colour === "function" ? colour(labelId) : "#0b5cad";
  }

  function regionBox(region, info, index, onclick) {
    const box = node("button", { type: "button", className: "slide-region", title: `region ${index + 1}: score `
      + `${region.score.toFixed(3)} at (${region.x}, ${region.y})`, "aria-label": `open the slide at region ${index + 1}`,
      dataset: { region: index }, onclick });
    box.style.left = `${(100 * region.x) / info.width}%`;
    box.style.top = `${(100 * region.y) / info.height}%`;
    box.style.width = `${Math.max(0.8, (100 * region.width) / info.width)}%`;
    box.style.height = `${Math.max(0.8, (100 * region.height) / info.height)}%`;
    return box;
  }

  function slideCard(slide) {
    const stage = node("div", { className: "slide-stage" });
    const img = node("img", { alt: `slide ${slide.slide_id}`, src: slideUrl(slide.slide_id, "thumbnail?size=384") });
    const open = node("button", { type: "button", className: "slide-open", "aria-label": `open slide ${slide.slide_id}`,
      onclick: () => openViewer(slide, 0) }, img);
    stage.append(open);
    img.addEventListener("error", () => { open.replaceChildren(node("div", { className: "noimg" }, "slide unavailable")); });
    slideInfo(slide.slide_id).then((info) => {
      stage.append(...slide.regions.map((r, i) => regionBox(r, info, i, () => openViewer(slide, i))));
    }).catch((e) => { stage.title = e.message; });
    const chip = node("span", { className: "chip" }, slide.label);
    chip.style.setProperty("--c", labelColour(slide.label_id));
    const card = node("figure", { className: "slide-card", dataset: { slide: slide.slide_id, label: slide.label } }, stage,
      node("figcaption", {}, node("div", {}, `${slide.rank}. `, chip),
        node("div", { className: "meta" }, `score ${slide.score.toFixed(3)}, ${slide.regions.length} region(s)`),
        node("div", { className: "meta" }, `${slide.slide_id} (case ${slide.case_id})`)));
    card.style.setProperty("--c", labelColour(slide.label_id));
    return card;
  }

  function drawSlides(answer) {
    const found = (answer && answer.slides) || [];
    byId("slides-section").hidden = !found.length;
    byId("slide-results").replaceChildren(...found.map(slideCard));
  }

  // --- The viewer ------------------------------------------------------------------

  function showViewerError(message) {
    byId("viewer-error").textContent = message;
    byId("viewer-error").hidden = !message;
  }

  function centreOn(region) {  // the region with a margin of its own size around it
    const rect = viewer.viewport.imageToViewportRectangle(region.x - region.width, region.y - region.height,
      3 * region.width, 3 * region.height);
    viewer.viewport.fitBounds(rect, true);
    for (const b of byId("viewer-regions").children) b.setAttribute("aria-pressed", String(b.dataset.region === String(region.index)));
    const centre = viewer.viewport.viewportToImageCoordinates(viewer.viewport.getCenter(true));
    Object.assign(byId("slide-viewer").dataset, { centreX: Math.round(centre.x), centreY: Math.round(centre.y) });
  }

  async function openViewer(slide, index) {
    const dialog = byId("slide-viewer");
    byId("viewer-title").textContent = `${slide.slide_id}: ${slide.label}, case ${slide.case_id}`;
    showViewerError("");
    if (!dialog.open) dialog.showModal();
    let info;
    try {
      info = await slideInfo(slide.slide_id);
    } catch (e) {
      showViewerError(e.message);
      return;
    }
    const regions = slide.regions.map((r, i) => ({ ...r, index: i }));
    byId("viewer-regions").replaceChildren(...regions.map((r) => node("button", { type: "button",
      dataset: { region: r.index }, onclick: () => centreOn(r) }, `region ${r.index + 1} (${r.score.toFixed(3)})`)));
    if (viewer) viewer.destroy();
    markOpenSeadragonCss();
    viewer = OpenSeadragon({
      element: byId("osd"), prefixUrl: "/static/vendor/openseadragon/images/", drawer: "canvas",
      showNavigator: false, animationTime: 0.4, loadTilesWithAjax: false, crossOriginPolicy: false,
      tileSources: { Image: { xmlns: "http://schemas.microsoft.com/deepzoom/2008", Url: info.deepzoom.tiles,
        Format: info.deepzoom.format, Overlap: String(info.deepzoom.overlap), TileSize: String(info.deepzoom.tile_size),
        Size: { Width: String(info.width), Height: String(info.height) } } },
    });
    viewer.addHandler("open", () => {
      for (const r of regions) {
        const outline = node("div", { className: "osd-region", dataset: { region: r.index } });
        viewer.addOverlay({ element: outline, location: viewer.viewport.imageToViewportRectangle(r.x, r.y, r.width, r.height) });
      }
      centreOn(regions[Math.min(index, regions.length - 1)] || { x: 0, y: 0, width: info.width / 3, height: info.height / 3 });
      byId("slide-viewer").dataset.ready = "true";
    });
    viewer.addHandler("open-failed", (e) => showViewerError(`the slide cannot be shown: ${e.message}`));
  }

  function markOpenSeadragonCss() {
    // OpenSeadragon injects a <style> (no focus outline on touch screens) unless one marked as its
    // own is there; the page's Content-Security-Policy refuses inline styles (even an empty one),
    // so the marker is an element named "style" outside the HTML namespace, which no browser takes
    // for a stylesheet, and the rule itself lives in slides.css.
    if (document.querySelector("style[data-openseadragon-mobile-css]")) return;
    const marker = document.createElementNS("urn:histojax:marker", "style");
    marker.setAttribute("data-openseadragon-mobile-css", "true");
    document.head.append(marker);
  }

  function closeViewer() {
    const dialog = byId("slide-viewer");
    if (viewer) { viewer.destroy(); viewer = null; }
    dialog.dataset.ready = "false";
    if (dialog.open) dialog.close();
  }

  document.addEventListener("histojax:answer", (e) => drawSlides(e.detail));
  byId("viewer-close").addEventListener("click", closeViewer);
  byId("slide-viewer").addEventListener("close", () => { if (viewer) { viewer.destroy(); viewer = null; } });
})();
