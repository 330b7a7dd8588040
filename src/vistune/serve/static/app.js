// vistune serve page: pick or drop an image, see every task's prediction. No build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { tasks: [], image: null, file: null, busy: false };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

function setStatus(text, error = false) {
  const s = $("#status");
  s.textContent = text;
  s.classList.toggle("error", error);
}

async function fetchJSON(url, options) {
  const r = await fetch(url, options);
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) throw new Error((body && body.detail) || `${r.status} ${r.statusText}`);
  return body;
}

function fmtCount(n) { return Number(n).toLocaleString("en-US"); }

async function loadTasks() {
  try {
    const j = await fetchJSON("/tasks");
    state.tasks = j.tasks;
    const b = j.backbone;
    $("#backbone").textContent =
      `${b.name} · ${b.img_size}px · ${j.tasks.length} task${j.tasks.length === 1 ? "" : "s"} on one backbone` +
      (b.bf16 ? " · bf16" : "");
    renderCards();
  } catch (err) {
    $("#backbone").textContent = "cannot list tasks: " + err.message;
  }
}

function renderCards() {
  const box = $("#tasks");
  box.replaceChildren();
  if (!state.tasks.length) {
    box.append(el("p", { class: "muted", text: "No task is loaded." }));
    return;
  }
  for (const t of state.tasks) {
    const params = fmtCount(t.tuned_params + t.head_params);
    const card = el("article", { class: "card", "data-task": t.name, "data-kind": t.kind, "data-state": "idle" },
      el("h2", { text: t.name }),
      el("p", { class: "meta", text: `${t.kind} · ${t.method} · ${t.num_classes} classes · ${params} tuned params` }),
      el("div", { class: "body" }, el("p", { class: "empty", text: "Waiting for an image." })));
    box.append(card);
  }
}

function card(name) { return document.querySelector(`.card[data-task="${CSS.escape(name)}"]`); }

function renderClassify(body, res) {
  res.top.forEach((p, i) => {
    const pct = (100 * p.prob).toFixed(1);
    body.append(el("div", { class: i === 0 ? "row top" : "row", "data-label": p.label, "data-prob": String(p.prob) },
      el("div", { class: "bar" },
        el("div", { class: "fill", style: `width:${Math.max(0.5, 100 * p.prob)}%` }),
        el("div", { class: "name", text: p.label, title: p.label })),
      el("span", { class: "pct", text: pct + "%" })));
  });
}

// A canvas with the picture 460 px wide (small ones enlarged at most 4x); a grey one of the right size when the browser
// cannot show the file (e.g. TIFF) but the server could read it.
function canvasFor(img, res) {
  const w = img ? img.naturalWidth : res.width, h = img ? img.naturalHeight : res.height;
  const scale = Math.min(4, 460 / w);  // small pictures are enlarged to the card's width
  const c = el("canvas");
  c.width = Math.round(w * scale);
  c.height = Math.round(h * scale);
  const g = c.getContext("2d");
  if (img) g.drawImage(img, 0, 0, c.width, c.height);
  else { g.fillStyle = "#888"; g.fillRect(0, 0, c.width, c.height); }
  return [c, scale];
}

async function renderSegment(body, res) {
  const [c] = canvasFor(state.image, res);
  const overlay = new Image();
  overlay.src = "data:image/png;base64," + res.overlay_png;
  await overlay.decode();
  c.getContext("2d").drawImage(overlay, 0, 0, c.width, c.height);
  c.setAttribute("data-drawn", "1");
  body.append(c);
  const legend = el("ul", { class: "legend" });
  for (const f of res.fractions) {
    legend.append(el("li", { "data-label": f.label },
      el("span", { class: "swatch", style: `background:${f.color}` }),
      el("span", { text: `${f.label} ${(100 * f.fraction).toFixed(1)}%` })));
  }
  body.append(legend);
}

function renderDetect(body, res) {
  const [c, scale] = canvasFor(state.image, res);
  const g = c.getContext("2d");
  g.lineWidth = 2;
  g.font = "12px system-ui, sans-serif";
  for (const b of res.boxes) {
    const [x1, y1, x2, y2] = b.box.map((v) => v * scale);
    g.strokeStyle = b.color;
    g.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const text = `${b.label} ${b.score.toFixed(2)}`;
    const w = g.measureText(text).width + 6;
    g.fillStyle = b.color;
    g.fillRect(x1, Math.max(0, y1 - 16), w, 16);
    g.fillStyle = "#fff";
    g.fillText(text, x1 + 3, Math.max(12, y1 - 4));
  }
  c.setAttribute("data-drawn", "1");
  body.append(c);
  body.append(el("p", { class: "empty", "data-boxes": String(res.boxes.length),
    text: `${res.boxes.length} box${res.boxes.length === 1 ? "" : "es"} with score ≥ ${res.threshold}` }));
}

async function renderResult(name, res) {
  const c = card(name);
  if (!c) return;
  const body = c.querySelector(".body");
  body.replaceChildren();
  if (res.kind === "classify") renderClassify(body, res);
  else if (res.kind === "segment") await renderSegment(body, res);
  else await renderDetect(body, res);
  c.setAttribute("data-state", "done");
}

async function predict() {
  if (!state.file || state.busy) return;
  state.busy = true;
  setStatus("predicting…");
  for (const c of document.querySelectorAll(".card")) c.setAttribute("data-state", "busy");
  const fd = new FormData();
  fd.append("file", state.file);
  fd.append("top_k", $("#topk").value || "5");
  fd.append("score_threshold", $("#threshold").value || "0.3");
  const t0 = performance.now();
  try {
    const j = await fetchJSON("/predict", { method: "POST", body: fd });
    for (const [name, res] of Object.entries(j.results)) await renderResult(name, res);
    setStatus(`${Object.keys(j.results).length} tasks in ${(performance.now() - t0).toFixed(0)} ms`);
  } catch (err) {
    setStatus(err.message, true);
    for (const c of document.querySelectorAll(".card")) c.setAttribute("data-state", "error");
  } finally {
    state.busy = false;
  }
}

async function useFile(file) {
  if (!file) return;
  state.file = file;
  const img = $("#preview");
  const url = URL.createObjectURL(file);
  img.src = url;
  try {
    await img.decode();
  } catch (_) {
    img.hidden = true;
    setStatus(`${file.name}: the browser cannot show this file; asking the server anyway…`);
    state.image = null;
    await predict();
    return;
  }
  img.hidden = false;
  $("#drop-text").textContent = file.name;
  state.image = img;
  await predict();
}

function setupInput() {
  const drop = $("#drop");
  $("#file").addEventListener("change", (e) => useFile(e.target.files[0]));
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("#file").click(); });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => useFile(e.dataTransfer.files[0]));
  for (const id of ["#topk", "#threshold"]) $(id).addEventListener("change", predict);
}

setupInput();
loadTasks();
