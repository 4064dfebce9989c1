// The review page: one pending frame at a time, one click or key per decision (docs/loop.md).
//
// Every action (a decision, undo, a filter change, the periodic refresh) runs through one queue, in the
// order the reviewer gave them: an undo pressed while the decision before it is still on its way undoes
// that decision, and a double click never decides the frame after the one that was meant.
"use strict";

// The URL the server prints carries the API token after "#token=" (a fragment: browsers never send it):
// keep it in this tab's session storage and take it out of the address bar and the history.
function tokenFromUrl() {
  const given = new URLSearchParams(location.hash.slice(1)).get("token");
  if (!given) return sessionStorage.getItem("reviewToken");
  sessionStorage.setItem("reviewToken", given);
  history.replaceState(null, "", location.pathname + location.search);
  return given;
}

const state = {
  labels: [], newClasses: [], frames: [], total: 0, shownId: null, history: [],
  token: tokenFromUrl(), queue: Promise.resolve(),
};
const $ = (id) => document.getElementById(id);

function enqueue(job) {
  state.queue = state.queue.then(job).catch((err) => say(err.message, false));
  return state.queue;
}

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json" }, sent = state.token;
  if (sent) headers.Authorization = `Bearer ${sent}`;
  const resp = await fetch(path, { ...options, headers });
  if (resp.status === 401) {
    if (state.token && state.token !== sent) return api(path, options);   // answered meanwhile: ask once only
    const token = prompt("API token (--token-file, or the review.token file in the store folder)");
    if (token) { state.token = token; sessionStorage.setItem("reviewToken", token); return api(path, options); }
  }
  if (!/^application\/json\b/i.test(resp.headers.get("Content-Type") || "")) {
    throw Object.assign(new Error(await notTheServers(resp)), { status: resp.status });
  }
  const body = await resp.json();
  if (!resp.ok) throw Object.assign(new Error(body.error || `HTTP ${resp.status}`), { body, status: resp.status });
  return body;
}

// This server answers JSON, errors too: anything else came from something in between (nginx's HTML 502 or 504
// page while the server is down or slow). Say so with the status and the start of its text, never as markup.
async function notTheServers(resp) {
  let said = "";
  try { said = (await resp.text()).slice(0, 20000); } catch (err) { said = ""; }
  said = said.replace(/<(script|style)\b[\s\S]*?<\/\1\s*>/gi, " ").replace(/<[^>]*>?/g, " ")
    .replace(/\s+/g, " ").trim().slice(0, 200);
  return `HTTP ${resp.status} from a proxy or server in between${said ? `: ${said}` : ""}`;
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
  q.set("order", $("order").value);   // least certain first: a labelling budget goes where the model is least sure
  return q;
}

// A filter's values as the server lists them: the ones with the most frames, at most its limit (/api/facets), and
// a last entry, never chosen, saying how many more there are. The value chosen stays listed while it is chosen
// (it may fall out of the busiest meanwhile). Rebuilt only when the list changed: an open list stays open.
function fillSelect(id, values, more = 0) {
  const select = $(id), keep = select.value;
  const shown = keep && !values.includes(keep) ? [...values, keep] : values;
  const key = JSON.stringify([shown, more]);
  if (select.dataset.values === key) return;
  select.dataset.values = key;
  select.dataset.more = String(more);
  select.replaceChildren(new Option("all", ""));
  for (const v of shown) select.add(new Option(v, v));
  if (more > 0) {
    const note = new Option(`\u2026 ${more} more, not listed (the ${values.length} with the most frames are)`, "");
    note.disabled = true;
    note.className = "more";
    select.add(note);
  }
  select.value = keep;
}

async function loadFacets() {
  const facets = await api("/api/facets"), more = facets.more || {};
  fillSelect("filter-station", facets.station, more.station);
  fillSelect("filter-model", facets.model_version, more.model_version);
  fillSelect("filter-predicted", facets.predicted, more.predicted);
}

// Also at every refresh: a first load that failed (server restarting, slow) is made good, and a new class another
// reviewer named appears here too; the buttons are rebuilt only when the labels changed.
async function loadLabels() {
  const body = await api("/api/labels");
  if (JSON.stringify([body.labels, body.new_classes]) === JSON.stringify([state.labels, state.newClasses])) return;
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

// The pending frames under the filters, in the chosen order; the frame on screen stays unless it is gone
// (decided elsewhere), then the first pending one is shown.
async function loadFrames(prefer = null) {
  const body = await api(`/api/frames?${filters()}`);
  state.frames = body.frames;
  state.total = body.total;
  $("pending-count").textContent = String(body.total);
  const want = prefer || state.shownId;
  const keep = state.frames.find((f) => f.id === want);
  show(keep || state.frames[0] || null);
}

function current() {
  return state.frames.find((f) => f.id === state.shownId) || null;
}

function show(frame) {
  $("empty").hidden = Boolean(frame);
  $("whole-item-wrap").hidden = !(frame && frame.item_pending > 1);     // kept current as frames of it arrive
  $("item-pending").textContent = String((frame && frame.item_pending) || 0);
  $("frame").hidden = !frame;
  if ((frame && frame.id) === state.shownId && frame) return;    // same frame: no flicker, no image reload
  state.shownId = frame ? frame.id : null;
  for (const id of ["topk", "why", "meta"]) $(id).replaceChildren();
  $("context").hidden = true;
  // the last frame's image goes at once: a slow or failed image never stands for the frame that is decided now
  clearImage($("frame-image"));
  if (!frame) { $("frame-id").textContent = ""; return; }
  showImage(frame.id).catch((err) => say(err.message, false));
  showContext(frame).catch((err) => say(err.message, false));
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
  const captured = frame.captured_at != null ? new Date(Number(frame.captured_at) * 1000).toISOString() : "";
  const meta = { station: `${frame.site}/${frame.station}`, camera: frame.camera,
                 model: `${frame.model_name || ""} ${frame.model_version || ""}`.trim(), captured,
                 predicted: `${frame.predicted} (${(100 * frame.confidence).toFixed(1)}%)`,
                 source: frame.source_ref || "" };
  const item = frame.meta && frame.meta.item;     // the best view of an item the station decided unsure
  if (item) meta.item = `#${item.item_seq}: its best view of ${item.frames} frames, decided unsure`;
  // the item the frame shows (its station's track): with other pending frames, one decision can take them all
  if (frame.track) meta.track = `${frame.track.slice(0, 8)}: ${frame.item_pending} pending frame(s) of this item`;
  for (const [k, v] of Object.entries(meta)) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k; dd.textContent = v;
    dt.dataset.field = k; dd.dataset.field = k;
    $("meta").append(dt, dd);
  }
}

// The ROI the station cut the crop from (its frame.v1 context), with the crop's box drawn on it.
async function showContext(frame) {
  const ctx = frame.meta && frame.meta.context;
  if (!frame.context_image || !ctx) return;
  const [x0, y0, x1, y1] = ctx.crop_box, w = ctx.roi_width, h = ctx.roi_height, box = $("context-box");
  Object.assign(box.style, { left: `${100 * x0 / w}%`, top: `${100 * y0 / h}%`,
                             width: `${100 * (x1 - x0) / w}%`, height: `${100 * (y1 - y0) / h}%` });
  await showImage(frame.id, "context", $("context-image"));
  if (state.shownId === frame.id) $("context").hidden = false;
}

// An <img> cannot send the Authorization header: with a token the JPEG is fetched and shown from a blob.
async function showImage(id, what = "image", img = $("frame-image")) {
  const url = `/api/frames/${encodeURIComponent(id)}/${what}`;
  if (!state.token) { img.src = url; return; }
  const resp = await fetch(url, { headers: { Authorization: `Bearer ${state.token}` } });
  if (state.shownId !== id) return;
  if (!resp.ok) throw new Error(`${id.slice(0, 8)}: its ${what} did not load (HTTP ${resp.status}); not shown`);
  const blob = await resp.blob();
  if (state.shownId !== id) return;
  clearImage(img);
  img.src = URL.createObjectURL(blob);
}

function clearImage(img) {
  const old = img.getAttribute("src") || "";
  img.removeAttribute("src");
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
}

// Decide the frame on screen when the action was given (not whichever is shown when the queue gets to it).
// With "all pending frames of this item" ticked, a label, new class or defect decides the item's other pending
// frames too (a skip is about this frame only: a sliver of an item says nothing of its whole views).
// The decision is sent as made on a pending frame: one another reviewer decided meanwhile (their page showed the
// same queue) is refused (409) and kept as they decided it, and this page goes on to the next frame. A frame this
// page decided itself is decided again (a quick correction), as an undo and a new decision would.
function decide(action, label) {
  const frame = current();
  if (!frame) { say("no frame to decide", false); return state.queue; }
  const reviewer = $("reviewer").value.trim() || null;
  const item = action !== "skip" && !$("whole-item-wrap").hidden && $("whole-item").checked;
  return enqueue(async () => {
    const body = { action, reviewer };
    if (label !== undefined && label !== null) body.label = label;
    if (item) body.item = true;
    if (!state.history.some((h) => h.id === frame.id)) body.expect = "pending";
    let done;
    try {
      done = await api(`/api/frames/${encodeURIComponent(frame.id)}/review`,
                       { method: "POST", body: JSON.stringify(body) });
    } catch (err) {
      if (err.status === 409) { await loadFrames(nextAfter(frame.id, new Set([frame.id]))); await loadStats(); }
      throw err;
    }
    const also = done.item_frames || [];
    state.history.push({ id: frame.id, item });
    say(`${frame.id.slice(0, 8)}${also.length ? ` and ${also.length} more of its item` : ""}: ` +
        `${action}${label ? " " + label : ""}`);
    if (action === "new_class") await loadLabels();
    await loadFrames(nextAfter(frame.id, new Set([frame.id, ...also])));
    await loadStats();
  });
}

// The id of the frame listed after ``id`` that is not ``gone``, or null.
function nextAfter(id, gone) {
  const at = state.frames.findIndex((f) => f.id === id);
  const next = state.frames.slice(at + 1).find((f) => !gone.has(f.id));
  return next ? next.id : null;
}

function undo() {
  return enqueue(async () => {
    const last = state.history.pop();
    if (!last) { say("nothing to undo", false); return; }
    const { id, item } = last;
    const body = item ? { action: "undo", item: true } : { action: "undo" };
    await api(`/api/frames/${encodeURIComponent(id)}/review`, { method: "POST", body: JSON.stringify(body) });
    say(`${id.slice(0, 8)}${item ? " and its item" : ""}: back to pending`);
    state.shownId = null;
    await loadFrames(id);
    await loadStats();
  });
}

function newClass() {
  const name = prompt("Name of the new class");
  if (name && name.trim()) decide("new_class", name.trim());
}

function defect() {
  const name = prompt("Defect class (may be empty)", "");
  if (name !== null) decide("defect", name.trim() || null);
}

// A new bundle version with a new class, from the frames reviewed as it (the server's --enrol-bundle). First its
// figures (a dry run: recall and the old classes' loss at each allowance), then the reviewer enrols it at one of
// the allowances the server allows: for a product like a trained one the allowance decides its recall.
function enrol() {
  const name = prompt("Enrol which new class? (its reviewed frames are the examples; at least 5)");
  if (!name || !name.trim()) return state.queue;
  const label = name.trim(), reviewer = $("reviewer").value.trim() || null;
  say(`measuring ${label} from its reviewed frames...`);
  return enqueue(async () => {
    const body = await api("/api/enrol", { method: "POST", body: JSON.stringify({ label, reviewer, dry_run: true }) });
    showEnrolment(body);
    say(`${label}: measured from ${body.frames} frames; choose how much the old classes may lose, or close`);
  });
}

function enrolAt(label, points) {
  const reviewer = $("reviewer").value.trim() || null;
  say(`enrolling ${label} at ${pointsText(points)}...`);
  return enqueue(async () => {
    let body;
    try {
      body = await api("/api/enrol", { method: "POST",
                                       body: JSON.stringify({ label, reviewer, max_drop_points: points }) });
    } catch (err) {
      if (err.body && err.body.figures) showEnrolment({ ...err.body, label, written: false });
      else enrolButtons(true);       // refused before any figures (busy, too few frames): nothing written, try again
      throw err;
    }
    showEnrolment(body);
    const gate = body.figures.gate;
    say(`${label} enrolled from ${body.frames} frames at ${pointsText(points)}: bundle ${body.name} ${body.version}; ` +
        `recall ${pct(body.figures.recall_leave_one_out)} (leave-one-out), old classes ` +
        `${(gate.accuracy_before * 100).toFixed(2)}% -> ${(gate.accuracy_after * 100).toFixed(2)}%`);
  });
}

function enrolButtons(enabled) {
  for (const b of $("enrol-curve").querySelectorAll("button.enrol-at")) b.disabled = !enabled;
}

const pct = (share) => `${(share * 100).toFixed(0)}%`;
const pointsText = (points) => `${points} point${String(points) === "1" ? "" : "s"}`;

// The enrolment's figures by allowance; before it is written, a button per allowance the server allows.
function showEnrolment(body) {
  const figures = body.figures, allowance = body.allowance, rows = $("enrol-curve").tBodies[0];
  $("enrol-title").textContent = body.written
    ? `${body.label} enrolled at ${pointsText(allowance.used)}: bundle ${body.name} ${body.version}`
    : `${body.label}: ${figures.examples} reviewed frames, not enrolled`;
  // what the model took its frames for: the trained product it resembles, whose items it will compete with
  $("enrol-like").textContent = "Before enrolment the model took most of its frames for " +
    `${figures.examples_decided_before_as}; the more alike the two, the more the old classes must give up for it ` +
    "to be recognised.";
  rows.replaceChildren();
  for (const at of figures.allowances) {
    const points = at.max_drop_points, tr = rows.insertRow();
    tr.dataset.points = String(points);
    tr.classList.toggle("used", body.written && points === allowance.used);
    for (const text of [pointsText(points), pct(at.recall_leave_one_out), pointsText(at.drop_points.toFixed(2))]) {
      tr.insertCell().textContent = text;
    }
    const cell = tr.insertCell();
    if (!body.written && points <= allowance.limit) {
      const button = document.createElement("button");
      button.className = "enrol-at";
      button.textContent = `Enrol at ${points}`;
      button.addEventListener("click", () => {      // one enrolment per preview: a second click would be refused
        enrolButtons(false);
        enrolAt(body.label, points);
      });
      cell.append(button);
    }
  }
  $("enrol-note").textContent = allowance.limit > allowance.default
    ? `This server lets a reviewer choose up to ${pointsText(allowance.limit)} (default ${allowance.default}).`
    : `This server allows ${pointsText(allowance.limit)}; more needs its --enrol-max-drop-limit.`;
  $("enrol-panel").hidden = false;
}

function move(step) {
  if (!state.frames.length) return;
  const at = state.frames.findIndex((f) => f.id === state.shownId);
  show(state.frames[(at + step + state.frames.length) % state.frames.length]);
}

// Progress over the whole store, and the storage quota's warning (set by the ingest service's --max-bytes).
async function loadStats() {
  const stats = await api("/api/stats");
  $("reviewed-count").textContent = String(stats.frames - stats.by_status.pending);
  const quota = stats.quota, banner = $("quota-warning");
  banner.hidden = !(quota && quota.warning);
  if (quota && quota.warning) {
    banner.textContent = `Frame storage at ${(100 * quota.fraction).toFixed(0)}% of its quota` +
      (quota.full ? ": new frames are being refused." : ".");
  }
  showIngestErrors(stats.mqtt_callback_errors);
}

// The ingest service's MQTT callback errors (counted in the store): each left a message unstored. Shown for a day
// after the last one, with the callbacks that failed; the ingest service's log has each with its traceback.
function showIngestErrors(errors) {
  const banner = $("ingest-warning");
  const recent = errors && errors.total > 0 && errors.last_at !== null && Date.now() / 1000 - errors.last_at < 86400;
  banner.hidden = !recent;
  if (!recent) return;
  const which = Object.entries(errors.by_callback).map(([hook, n]) => `${hook} ${n}`).join(", ");
  banner.textContent = `The ingest service is failing: ${errors.total} error(s) in its MQTT callbacks (${which}), ` +
    `the last at ${new Date(errors.last_at * 1000).toLocaleString()}. Frames may be missing: see its log.`;
}

// The first load and every refresh: one that fails (server down or restarting, an error) says so and the next one
// tries again, so a page opened while the server was away fills in once it answers.
function refresh() {
  return enqueue(async () => {
    try {
      if (!state.loaded) await loadEnrolment();
      await loadLabels();
      await loadFacets();
      await loadFrames();
      await loadStats();
    } catch (err) {
      state.refreshFailed = true;
      throw new Error(`cannot reach the review server (${err.message}); retrying every 3 s`);
    }
    if (!state.loaded || state.refreshFailed) say(state.loaded ? "server answering again" : "ready");
    state.loaded = true;
    state.refreshFailed = false;
  });
}

document.addEventListener("keydown", (ev) => {
  // Typing in the name field or picking a filter is not a decision, nor is a key held down (auto-repeat would
  // label frame after frame the reviewer never saw).
  if (ev.target instanceof HTMLInputElement || ev.target instanceof HTMLSelectElement) return;
  if (ev.repeat || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const all = [...state.labels, ...state.newClasses];
  if (/^[0-9]$/.test(ev.key)) {
    const i = ev.key === "0" ? 9 : Number(ev.key) - 1;
    if (all[i]) decide("label", all[i]);
  } else if (ev.key === "s") decide("skip");
  else if (ev.key === "n") newClass();
  else if (ev.key === "d") defect();
  else if (ev.key === "u") undo();
  else if (ev.key === "i" && !$("whole-item-wrap").hidden) wholeItem(!$("whole-item").checked);
  else if (ev.key === "ArrowRight") move(1);
  else if (ev.key === "ArrowLeft") move(-1);
  else return;
  ev.preventDefault();
});

$("skip").addEventListener("click", () => decide("skip"));
$("new-class").addEventListener("click", newClass);
$("defect").addEventListener("click", defect);
$("undo").addEventListener("click", undo);
$("enrol").addEventListener("click", enrol);
$("enrol-close").addEventListener("click", () => { $("enrol-panel").hidden = true; });
$("prev").addEventListener("click", () => move(-1));
$("next").addEventListener("click", () => move(1));
for (const id of ["filter-station", "filter-model", "filter-predicted", "order"]) {
  $(id).addEventListener("change", () => enqueue(() => { state.shownId = null; return loadFrames(); }));
}
const savedOrder = localStorage.getItem("order");
if ([...$("order").options].some((o) => o.value === savedOrder)) $("order").value = savedOrder;
$("order").addEventListener("change", () => localStorage.setItem("order", $("order").value));
// the choice to decide whole items is kept, like the order; the box gives the keys back once clicked
function wholeItem(on) {
  $("whole-item").checked = on;
  localStorage.setItem("wholeItem", on ? "1" : "0");
}
wholeItem(localStorage.getItem("wholeItem") === "1");
$("whole-item").addEventListener("change", (ev) => { wholeItem(ev.target.checked); ev.target.blur(); });
$("reviewer").value = localStorage.getItem("reviewer") || "";
$("reviewer").addEventListener("change", () => localStorage.setItem("reviewer", $("reviewer").value.trim()));

// Enrolment is offered only by a server started with --enrol-bundle.
async function loadEnrolment() {
  $("enrol").hidden = !(await api("/api/enrol")).enabled;
}

refresh();
// New frames keep arriving from ingest: refresh the queue and the filters every few seconds; never a second
// refresh queued behind one still waiting (a slow store would pile them up ahead of the reviewer's decisions).
let refreshing = false;
setInterval(() => {
  if (refreshing) return;
  refreshing = true;
  refresh().finally(() => { refreshing = false; });
}, 3000);
