// Warehouse dashboard page: one EventSource on /events; the server sends the whole state first
// ("snapshot"), then "station" (one station's full view), "rollout" (one central event) and "meta"
// (counters, broker connection). Everything from the network is put in the page with textContent,
// never as HTML. Element ids and data-attributes are documented in docs/dashboard.md.
"use strict";

const page = {
  stations: new Map(),     // key -> latest view
  rollout: new Map(),      // id -> event (kept in arrival order, newest shown first)
  clockOffset: 0,          // server time - browser time, seconds
};

const $ = (sel, root = document) => root.querySelector(sel);
const field = (card, name) => card.querySelector(`[data-field="${name}"]`);

function text(el, value) {
  const s = value === null || value === undefined ? "" : String(value);
  if (el.textContent !== s) el.textContent = s;
}

function el(tag, attrs = {}, content = null) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  }
  if (content !== null && content !== undefined) node.textContent = String(content);
  return node;
}

function pct(x) { return x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`; }
function num(x, digits = 1) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.max(0, Math.floor(s));
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h ${m}m`;
  if (h) return `${h}h ${m}m ${s % 60}s`;
  return `${m}m ${s % 60}s`;
}
function clockTime(epoch) {
  if (!epoch) return "";
  return new Date(epoch * 1000).toLocaleTimeString();
}
function serverNow() { return Date.now() / 1000 + page.clockOffset; }

// ------------------------------------------------------------------ stations

function stationCard(key) {
  let card = document.querySelector(`.station[data-station="${CSS.escape(key)}"]`);
  if (card) return card;
  card = $("#station-template").content.firstElementChild.cloneNode(true);
  card.dataset.station = key;
  card.id = `station-${key.replace(/[^A-Za-z0-9_-]/g, "-")}`;
  const container = $("#stations");
  const after = [...container.children].find((c) => c.dataset.station > key);
  container.insertBefore(card, after || null);
  return card;
}

function renderStation(view) {
  page.stations.set(view.key, view);
  const card = stationCard(view.key);
  card.dataset.health = view.health;
  card.dataset.modelVersion = view.model ? view.model.version : "";
  text(field(card, "name"), view.key);
  text(field(card, "health"), view.health);
  text(field(card, "role"), view.role || "");
  renderModel(card, view);
  renderCameras(card, view.cameras_up || {});
  renderUpdate(card, view.last_model_update);
  renderRolloutFact(card, view.rollout);
  renderStats(card, view);
  renderChart(field(card, "lowconf-chart"), view.history || [], card);
  renderList(field(card, "results"), view.results, resultItem);
  renderList(field(card, "decisions"), view.decisions, decisionItem);
  renderList(field(card, "alerts"), view.alerts, alertItem);
  renderUptime(card, view);
  renderTotals();
}

function renderModel(card, view) {
  const m = view.model;
  text(field(card, "model-name"), m ? m.name : "no model");
  text(field(card, "model-version"), m ? m.version : "");
  text(field(card, "model-runtime"), m ? `${m.backend}, ${m.precision}` : "");
}

function renderCameras(card, cameras) {
  const box = field(card, "cameras");
  box.replaceChildren(...Object.entries(cameras).sort().map(([id, ok]) =>
    el("span", { class: "camera", "data-camera": id, "data-connected": ok }, ok ? id : `${id} (down)`)));
  if (!box.children.length) text(box, "–");
}

function renderUpdate(card, update) {
  const box = field(card, "last-model-update");
  if (!update) {
    box.dataset.ok = "none";
    text(box, "none since start");
    return;
  }
  box.dataset.ok = String(update.ok);
  const running = update.running ? `${update.running.version}` : "?";
  text(box, update.ok ? `installed ${running} at ${clockTime(update.ts)}`
                      : `rejected at ${clockTime(update.ts)}, still running ${running}: ${update.reason}`);
}

function renderRolloutFact(card, event) {
  const box = field(card, "rollout");
  if (!event) {
    box.dataset.ok = "none";
    text(box, "–");
    return;
  }
  box.dataset.ok = String(event.ok);
  text(box, `${event.action} ${event.model.version} ${event.ok ? "ok" : "FAILED"}${event.reason ? ": " + event.reason : ""}`);
}

function renderStats(card, view) {
  const s = view.stats;
  if (!s) {
    for (const name of ["fps", "fps-detail", "lowconf-rate", "lowconf-detail", "outbox-depth", "outbox-detail",
                        "frames-dropped", "errors"]) text(field(card, name), /detail|errors/.test(name) ? "" : "–");
    text(field(card, "stats-age"), "no stats yet");
    field(card, "latency").tBodies[0].replaceChildren();
    return;
  }
  text(field(card, "fps"), num(s.fps_total));
  text(field(card, "fps-detail"), Object.entries(s.fps).map(([c, v]) => `${c} ${num(v)}`).join(", "));
  text(field(card, "lowconf-rate"), pct(s.low_confidence_rate));
  const last = (view.history || []).at(-1);
  text(field(card, "lowconf-detail"),
       last && last.recent_low_confidence_rate !== null
         ? `last interval ${pct(last.recent_low_confidence_rate)} of ${last.recent_frames}` : "");
  const outbox = field(card, "outbox-depth");
  text(outbox, s.outbox.depth);
  outbox.dataset.depth = s.outbox.depth;
  text(field(card, "outbox-detail"), `${bytes(s.outbox.bytes)}, ${s.outbox.dropped_total} dropped` +
       (s.outbox.dropped_total ? ` (${Object.entries(s.outbox.dropped).map(([r, n]) => `${r} ${n}`).join(", ")})` : ""));
  text(field(card, "frames-dropped"), s.frames_dropped_total);
  const errors = field(card, "errors");
  errors.dataset.errors = String(s.inference_errors ?? "");
  text(errors, s.inference_errors === null || s.inference_errors === undefined ? ""
               : `${s.inference_errors} inference error${s.inference_errors === 1 ? "" : "s"}`);
  const rows = Object.entries(s.latency).map(([stage, p]) => {
    const tr = el("tr", { "data-stage": stage });
    tr.append(el("td", {}, stage), el("td", {}, num(p.p50_ms)), el("td", {}, num(p.p95_ms)), el("td", {}, num(p.p99_ms)));
    return tr;
  });
  field(card, "latency").tBodies[0].replaceChildren(...rows);
}

function renderUptime(card, view) {
  const box = field(card, "uptime");
  if (view.health === "offline") {
    text(box, `offline since ${clockTime(view.status_received_at)}`);
  } else if (view.uptime_s !== null && view.uptime_s !== undefined && view.status_received_at) {
    text(box, duration(view.uptime_s + serverNow() - view.status_received_at));
  } else {
    text(box, "–");
  }
  const age = field(card, "stats-age");
  if (view.stats_received_at) {
    const secs = serverNow() - view.stats_received_at;
    text(age, view.health === "stale" ? `no stats for ${duration(secs)}` : `stats ${Math.max(0, Math.round(secs))} s ago`);
  }
}

function renderList(list, items, make) {
  const want = (items || []).map((x) => x.id);
  const have = [...list.children].map((li) => li.dataset.id);
  if (want.length === have.length && want.every((id, i) => id === have[i])) return;
  const byId = new Map([...list.children].map((li) => [li.dataset.id, li]));
  list.replaceChildren(...(items || []).map((item) => byId.get(item.id) || make(item)));
}

function resultItem(r) {
  const li = el("li", { "data-id": r.id, "data-label": r.label, "data-low-confidence": r.low_confidence,
                        "data-model-version": r.model_version,
                        title: `${r.top_k.map((t) => `${t.label} ${pct(t.p)}`).join(", ")}` +
                               (r.reasons.length ? ` — low confidence: ${r.reasons.join(", ")}` : "") });
  li.textContent = `${r.camera} #${r.frame_seq}: ${r.label} ${pct(r.confidence)}${r.low_confidence ? " (low)" : ""}`;
  return li;
}

function decisionItem(d) {
  const li = el("li", { "data-id": d.id, "data-label": d.label, "data-lane": d.lane,
                        "data-low-confidence": d.low_confidence,
                        title: `item ${d.item_seq}: ${d.frames} frames, agreement ${pct(d.agreement)}` });
  li.textContent = `${d.label} ${pct(d.confidence)} → ${d.lane}`;
  return li;
}

function alertItem(a) {
  const li = el("li", { "data-id": a.id, "data-defect": a.defect, title: a.top_k.map((t) => `${t.label} ${pct(t.p)}`).join(", ") });
  if (a.thumbnail_jpeg_b64 && /^[A-Za-z0-9+/=]+$/.test(a.thumbnail_jpeg_b64)) {
    li.append(el("img", { alt: `${a.defect} evidence`, src: `data:image/jpeg;base64,${a.thumbnail_jpeg_b64}` }));
  }
  li.append(document.createTextNode(`${a.defect} ${pct(a.confidence)} on ${a.camera} #${a.frame_seq} at ${clockTime(a.ts)}`));
  return li;
}

// The low-confidence rate over the stats history: the station's rate since its start (solid) and the
// share of low-confidence results the dashboard received in each stats interval (dashed).
function renderChart(svg, history, card) {
  const NS = "http://www.w3.org/2000/svg";
  const W = 300, H = 70;
  const values = history.flatMap((p) => [p.low_confidence_rate, p.recent_low_confidence_rate]).filter((v) => v !== null);
  const top = Math.min(1, Math.max(0.1, ...values) * 1.1);
  const x = (i) => (history.length > 1 ? (i / (history.length - 1)) * W : W / 2);
  const y = (v) => H - (v / top) * (H - 4) - 2;
  const line = (series, pick) => {
    const pts = history.map((p, i) => [i, pick(p)]).filter(([, v]) => v !== null && v !== undefined);
    const poly = document.createElementNS(NS, "polyline");
    poly.setAttribute("data-series", series);
    poly.setAttribute("data-points", String(pts.length));
    poly.setAttribute("points", pts.map(([i, v]) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" "));
    return poly;
  };
  const grid = [0, 0.5, 1].map((f) => {
    const g = document.createElementNS(NS, "line");
    g.setAttribute("class", "grid");
    g.setAttribute("x1", "0");
    g.setAttribute("x2", String(W));
    g.setAttribute("y1", y(f * top).toFixed(1));
    g.setAttribute("y2", y(f * top).toFixed(1));
    return g;
  });
  svg.replaceChildren(...grid, line("since-start", (p) => p.low_confidence_rate),
                      line("recent", (p) => p.recent_low_confidence_rate));
  svg.dataset.points = String(history.length);
  text(field(card, "chart-scale"), history.length ? `0–${pct(top)}, ${history.length} points` : "no stats yet");
}

function renderTotals() {
  const views = [...page.stations.values()];
  text($("#count-stations"), views.length);
  for (const h of ["online", "stale", "offline"]) text($(`#count-${h}`), views.filter((v) => v.health === h).length);
  $("#no-stations").hidden = views.length > 0;
}

// ------------------------------------------------------------------ rollout events, counters

function rolloutItem(e) {
  const li = el("li", { class: "rollout-event", "data-id": e.id, "data-action": e.action, "data-ok": e.ok,
                        "data-model-version": e.model.version });
  const head = el("div", { class: "head" });
  head.append(el("span", { class: "action" }, e.action), el("span", { class: "model" }, `${e.model.name} ${e.model.version}`),
              el("span", { class: "outcome" }, e.ok ? "ok" : "FAILED"));
  li.append(head);
  if (e.reason) li.append(el("div", { class: "reason" }, e.reason));
  if (e.stations.length) li.append(el("div", { class: "stations" }, e.stations.join(", ")));
  const figures = Object.entries(e.figures || {}).filter(([, v]) => typeof v === "number" || typeof v === "string");
  if (figures.length) {
    li.append(el("div", { class: "figures" }, figures.map(([k, v]) => `${k} ${typeof v === "number" ? Number(v.toFixed(4)) : v}`).join(", ")));
  }
  li.append(el("div", { class: "when" }, e.ts));
  return li;
}

function renderRollout(event) {
  if (page.rollout.has(event.id)) return;
  page.rollout.set(event.id, event);
  $("#rollout-events").prepend(rolloutItem(event));
  const list = $("#rollout-events");
  while (list.children.length > 50) list.lastElementChild.remove();
}

function renderMeta(meta) {
  page.clockOffset = meta.server_time - Date.now() / 1000;
  const broker = $("#broker-status");
  broker.dataset.connected = String(meta.broker.connected);
  text(broker, meta.broker.connected ? "broker: connected" : "broker: DISCONNECTED");
  broker.title = meta.broker.detail || "";
  const c = meta.counters;
  text($("#count-received"), c.received);
  text($("#count-duplicates"), c.duplicates);
  text($("#count-malformed"), c.malformed);
  $("#malformed").replaceChildren(...meta.malformed.map((m) =>
    el("li", { "data-topic": m.topic }, `${clockTime(m.at)} ${m.reason}`)));
  document.body.dataset.version = String(meta.version);
}

function renderSnapshot(snap) {
  page.stations.clear();
  page.rollout.clear();
  $("#stations").replaceChildren();
  $("#rollout-events").replaceChildren();
  renderMeta(snap);
  for (const view of snap.stations) renderStation(view);
  for (const event of [...snap.rollout].reverse()) renderRollout(event);
  renderTotals();
}

// ------------------------------------------------------------------ the stream

function connect() {
  const stream = new EventSource("/events");
  const status = $("#stream-status");
  const on = (name, fn) => stream.addEventListener(name, (msg) => {
    try { fn(JSON.parse(msg.data)); } catch (err) { console.error(`dashboard: bad ${name} event`, err); }
  });
  stream.onopen = () => {
    status.dataset.connected = "true";
    text(status, "live");
    document.body.dataset.stream = "open";
  };
  stream.onerror = () => {
    status.dataset.connected = "false";
    text(status, "live: reconnecting…");
    document.body.dataset.stream = "reconnecting";
  };
  on("snapshot", renderSnapshot);
  on("station", renderStation);
  on("rollout", renderRollout);
  on("meta", renderMeta);
}

setInterval(() => {
  for (const view of page.stations.values()) renderUptime(stationCard(view.key), view);
}, 1000);

connect();
