// The image viewer: the image at its own resolution inside a frame, fitted at first; zoom (wheel,
// buttons, + and −) about the pointer or the centre, move by dragging or the arrow keys, brightness
// and contrast, the heat map's opacity. Viewers may be linked (the two visits of a comparison move
// together).
function Viewer(frame, onChange) {
  const content = frame.querySelector(".viewer-content");
  const image = content.querySelector("img");
  const state = { scale: 1, fit: 1, x: 0, y: 0 };
  const self = this;
  this.state = state;
  function natural() { return { w: image.naturalWidth || 1, h: image.naturalHeight || 1 }; }
  function clamp() {
    const n = natural(), fw = frame.clientWidth, fh = frame.clientHeight;
    const w = n.w * state.scale, h = n.h * state.scale;
    state.x = w <= fw ? (fw - w) / 2 : Math.min(0, Math.max(fw - w, state.x));
    state.y = h <= fh ? (fh - h) / 2 : Math.min(0, Math.max(fh - h, state.y));
  }
  function draw() {
    clamp();
    const n = natural();
    content.style.width = n.w + "px";
    content.style.height = n.h + "px";
    content.style.transform = "translate(" + state.x + "px," + state.y + "px) scale(" + state.scale + ")";
    image.classList.toggle("zoomed", state.scale > 1.5);
    frame.dataset.scale = state.scale.toFixed(3);
  }
  this.fit = function () {
    const n = natural();
    state.fit = Math.min(frame.clientWidth / n.w, frame.clientHeight / n.h);
    state.scale = state.fit;
    draw();
    if (onChange) onChange(self);
  };
  this.zoom = function (factor, cx, cy) {
    const fw = frame.clientWidth, fh = frame.clientHeight;
    cx = cx === undefined ? fw / 2 : cx;
    cy = cy === undefined ? fh / 2 : cy;
    const next = Math.min(Math.max(state.scale * factor, Math.min(state.fit * 0.5, 1)), 16);
    state.x = cx - (cx - state.x) * (next / state.scale);
    state.y = cy - (cy - state.y) * (next / state.scale);
    state.scale = next;
    draw();
    if (onChange) onChange(self);
  };
  this.actual = function () { this.zoom(1 / state.scale); };
  this.move = function (dx, dy) { state.x += dx; state.y += dy; draw(); if (onChange) onChange(self); };
  this.copy = function (other) {  // the same view as another viewer, relative to each one's fit
    const ratio = state.fit / other.state.fit;
    state.scale = other.state.scale * ratio;
    state.x = other.state.x * ratio;
    state.y = other.state.y * ratio;
    draw();
  };
  frame.addEventListener("wheel", function (event) {
    event.preventDefault();
    const box = frame.getBoundingClientRect();
    self.zoom(event.deltaY < 0 ? 1.2 : 1 / 1.2, event.clientX - box.left, event.clientY - box.top);
  }, { passive: false });
  let drag = null;
  frame.addEventListener("pointerdown", function (event) {
    drag = { x: event.clientX, y: event.clientY };
    frame.setPointerCapture(event.pointerId);
    frame.classList.add("dragging");
  });
  frame.addEventListener("pointermove", function (event) {
    if (!drag) return;
    self.move(event.clientX - drag.x, event.clientY - drag.y);
    drag = { x: event.clientX, y: event.clientY };
  });
  ["pointerup", "pointercancel"].forEach(function (name) {
    frame.addEventListener(name, function () { drag = null; frame.classList.remove("dragging"); });
  });
  frame.addEventListener("keydown", function (event) {
    const step = 40, moves = { ArrowLeft: [step, 0], ArrowRight: [-step, 0], ArrowUp: [0, step], ArrowDown: [0, -step] };
    if (moves[event.key]) { event.preventDefault(); self.move(moves[event.key][0], moves[event.key][1]); }
  });
  if (image.complete && image.naturalWidth) this.fit();
  image.addEventListener("load", function () { self.fit(); });
  window.addEventListener("resize", function () { self.fit(); });
}

(function () {
  const frame = document.getElementById("viewer");
  if (!frame) return;
  const level = document.getElementById("zoom-level");
  const viewer = new Viewer(frame, function (v) {
    level.textContent = Math.round(100 * v.state.scale) + " %";
  });
  window.dermascanViewer = viewer;
  document.querySelectorAll("[data-zoom]").forEach(function (button) {
    button.addEventListener("click", function () {
      const how = button.dataset.zoom;
      if (how === "in") viewer.zoom(1.25);
      else if (how === "out") viewer.zoom(0.8);
      else if (how === "fit") viewer.fit();
      else viewer.actual();
    });
  });
  const image = document.getElementById("lesion");
  const brightness = document.getElementById("brightness"), contrast = document.getElementById("contrast");
  function filters() { image.style.filter = "brightness(" + brightness.value + "%) contrast(" + contrast.value + "%)"; }
  brightness.addEventListener("input", filters);
  contrast.addEventListener("input", filters);
  const toggle = document.getElementById("toggle-heatmap");
  const heat = document.getElementById("heatmap");
  const opacity = document.getElementById("heatmap-opacity");
  if (toggle && heat) {
    toggle.addEventListener("change", function () { heat.hidden = !toggle.checked; });
    opacity.addEventListener("input", function () { heat.style.opacity = opacity.value / 100; });
  }
  // keyboard shortcuts, except while typing in a form field
  document.addEventListener("keydown", function (event) {
    const target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (target && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].indexOf(target.tagName) >= 0)) return;
    const key = event.key;
    if (key === "+" || key === "=") viewer.zoom(1.25);
    else if (key === "-" || key === "−") viewer.zoom(0.8);
    else if (key === "0") viewer.fit();
    else if (key === "1") viewer.actual();
    else if ((key === "h" || key === "H") && toggle) { toggle.checked = !toggle.checked; toggle.dispatchEvent(new Event("change")); }
    else if (key === "d" || key === "D") {
      const first = document.querySelector("#decision-form input[type=radio]") || document.querySelector("#amend summary");
      if (first) { first.focus(); first.scrollIntoView({ block: "center" }); }
    } else if (key === "n" || key === "N") {
      const next = document.getElementById("next-case");
      const holding = document.getElementById("decision-form");
      if (next && (!holding || window.confirm("Leave this case undecided (it stays yours until the claim runs out) and claim the next one?"))) next.submit();
    } else return;
    event.preventDefault();
  });
})();

(function () {
  // lesion follow-up: two visits side by side, the same size, the heat maps toggled together
  const both = document.getElementById("compare-heatmaps");
  const sides = ["a", "b"];
  function show(side) {
    const select = document.getElementById("compare-" + side);
    if (!select) return;
    const option = select.options[select.selectedIndex];
    const image = document.getElementById("compare-" + side + "-image");
    const heat = document.getElementById("compare-" + side + "-heatmap");
    if (image.getAttribute("src") !== option.dataset.image) image.src = option.dataset.image;
    heat.src = option.dataset.heatmap || "";
    heat.hidden = !(both && both.checked && option.dataset.heatmap);
    document.getElementById("compare-" + side + "-caption").textContent =
      option.textContent + (both && both.checked && !option.dataset.heatmap ? " (no heat map)" : "");
  }
  sides.forEach(function (side) {
    const select = document.getElementById("compare-" + side);
    if (select) select.addEventListener("change", function () { show(side); });
  });
  if (both) both.addEventListener("change", function () { sides.forEach(show); });
  sides.forEach(show);
  // the same viewer on both visits, moving together
  const frames = sides.map(function (side) { return document.getElementById("compare-" + side + "-frame"); });
  if (frames[0] && frames[1]) {
    const viewers = [];
    let syncing = false;
    frames.forEach(function (frame, i) {
      viewers[i] = new Viewer(frame, function (moved) {
        if (syncing) return;
        syncing = true;
        viewers.forEach(function (other) { if (other && other !== moved) other.copy(moved); });
        syncing = false;
      });
    });
  }
})();

(function () {
  // "Release back to the queue" asks first
  const release = document.getElementById("release-form");
  if (release) release.addEventListener("submit", function (event) {
    if (!window.confirm(release.dataset.confirm)) event.preventDefault();
  });
})();
