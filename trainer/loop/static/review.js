// The review page: one pending frame at a time, one click or key per decision (docs/loop.md).
"use strict";

const state = { labels: [], newClasses: [], frames: [], index: 0, history: [], token: sessionStorage.getItem("reviewToken") };
const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const resp = await fetch(path, { ...options, headers });
  if (resp.status === 401) {
    state.token = prompt("API token");
    if (state.token) { sessionStorage.setItem("reviewToken", state.token); return api(path, options); }
  }
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || `${resp.status}`);
  return body;
}

function say(text, ok = true) {
  const el = $("status");
  el.textContent = text;
  el.dataset.state = ok ? "ok" : "error";
}

function filters() {
  const q = new URLSearchParams({ status: "pending", limit: "200" });
  const add = (key, id) => { if ($(id).value) q.set(key, $(id).value); };
  add("station", "filter-station"); add("model_version", "filter-model"); add("predicted", "filter-predicted");
  return q;
}

function fillSelect(id, values) {
  const select = $(id), keep = select.value;
  select.replaceChildren(new Option("all", ""));
  for (const v of values) select.add(new Option(v, v));
  select.value = values.includes(keep) ? keep : "";
}

async function loadFacets() {
  const facets = await api("/api/facets");
  fillSelect("filter-station", facets.station);
  fillSelect("filter-model", facets.model_version);
  fillSelect("filter-predicted", facets.predicted);
}

async function loadLabels() {
  const body = await api("/api/labels");
  state.labels = body.labels;
  state.newClasses = body.new_classes;
  const box = $("labels");
  box.replaceChildren();
  [...state.labels, ...state.newClasses].forEach((label, i) => {
    const b = document.createElement("button");
    b.dataset.label = label;
    b.textContent = label + " ";
    if (i < 10) { const k = document.createElement("kbd"); k.textContent = String((i + 1) % 10); b.append(k); }
    if (i >= state.labels.length) b.classList.add("new");
    b.addEventListener("click", () => decide("label", label));
    box.append(b);
  });
}

async function loadFrames() {
  const body = await api(`/api/frames?${filters()}`);
  state.frames = body.frames;
  state.index = Math.min(state.index, Math.max(0, state.frames.length - 1));
  $("pending-count").textContent = String(body.total);
  show();
}

function show() {
  const frame = state.frames[state.index];
  $("empty").hidden = Boolean(frame);
  $("frame").hidden = !frame;
  for (const id of ["topk", "why", "meta"]) $(id).replaceChildren();
  if (!frame) { $("frame-id").textContent = ""; return; }
  $("frame-image").src = `/api/frames/${encodeURIComponent(frame.id)}/image`;
  $("frame-id").textContent = frame.id;
  for (const k of frame.top_k) {
    const li = document.createElement("li");
    li.dataset.label = k.label;
    li.dataset.p = String(k.p);
    li.textContent = `${k.label} ${(100 * k.p).toFixed(1)}%`;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.round(120 * k.p)}px`;
    li.append(bar);
    $("topk").append(li);
  }
  for (const reason of frame.selected_because) {
    const li = document.createElement("li");
    li.textContent = reason;
    $("why").append(li);
  }
  const captured = frame.captured_at ? new Date(Number(frame.captured_at) * 1000).toISOString() : "";
  const meta = { station: `${frame.site}/${frame.station}`, camera: frame.camera,
                 model: `${frame.model_name || ""} ${frame.model_version || ""}`, captured,
                 source: frame.source_ref || "" };
  for (const [k, v] of Object.entries(meta)) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k; dd.textContent = v;
    $("meta").append(dt, dd);
  }
}

async function decide(action, label) {
  const frame = state.frames[state.index];
  if (!frame) return;
  const body = { action, reviewer: $("reviewer").value || null };
  if (label !== undefined && label !== null) body.label = label;
  try {
    await api(`/api/frames/${encodeURIComponent(frame.id)}/review`, { method: "POST", body: JSON.stringify(body) });
    state.history.push(frame.id);
    say(`${frame.id.slice(0, 8)}: ${action}${label ? " " + label : ""}`);
    if (action === "new_class") await loadLabels();
    await loadFrames();
  } catch (err) {
    say(err.message, false);
  }
}

async function undo() {
  const id = state.history.pop();
  if (!id) { say("nothing to undo", false); return; }
  try {
    await api(`/api/frames/${encodeURIComponent(id)}/review`, { method: "POST", body: JSON.stringify({ action: "undo" }) });
    say(`${id.slice(0, 8)}: back to pending`);
    await loadFrames();
    const at = state.frames.findIndex((f) => f.id === id);
    if (at >= 0) { state.index = at; show(); }
  } catch (err) {
    say(err.message, false);
  }
}

function newClass() {
  const name = prompt("Name of the new class");
  if (name && name.trim()) decide("new_class", name.trim());
}

function defect() {
  const name = prompt("Defect class (may be empty)", "");
  if (name !== null) decide("defect", name.trim() || null);
}

function move(step) {
  if (!state.frames.length) return;
  state.index = (state.index + step + state.frames.length) % state.frames.length;
  show();
}

document.addEventListener("keydown", (ev) => {
  if (ev.target instanceof HTMLInputElement || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const all = [...state.labels, ...state.newClasses];
  if (/^[0-9]$/.test(ev.key)) {
    const i = ev.key === "0" ? 9 : Number(ev.key) - 1;
    if (all[i]) decide("label", all[i]);
  } else if (ev.key === "s") decide("skip");
  else if (ev.key === "n") newClass();
  else if (ev.key === "d") defect();
  else if (ev.key === "u") undo();
  else if (ev.key === "ArrowRight") move(1);
  else if (ev.key === "ArrowLeft") move(-1);
  else return;
  ev.preventDefault();
});

$("skip").addEventListener("click", () => decide("skip"));
$("new-class").addEventListener("click", newClass);
$("defect").addEventListener("click", defect);
$("undo").addEventListener("click", undo);
$("prev").addEventListener("click", () => move(-1));
$("next").addEventListener("click", () => move(1));
for (const id of ["filter-station", "filter-model", "filter-predicted"]) {
  $(id).addEventListener("change", () => { state.index = 0; loadFrames().catch((e) => say(e.message, false)); });
}
$("reviewer").value = localStorage.getItem("reviewer") || "";
$("reviewer").addEventListener("change", () => localStorage.setItem("reviewer", $("reviewer").value));

(async () => {
  try {
    await Promise.all([loadLabels(), loadFacets()]);
    await loadFrames();
    say("ready");
  } catch (err) {
    say(err.message, false);
  }
  // new frames keep arriving from ingest: refresh the queue and the filters while idle
  setInterval(() => { loadFacets().then(loadFrames).catch((e) => say(e.message, false)); }, 5000);
})();
