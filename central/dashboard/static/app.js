// Warehouse dashboard page. One EventSource on /events?<the list's query>&station=<open card>; the server sends
// "overview" (the fleet summary), "stations" (this page of the station list: rows, total), "rows" (only the
// rows of that page that changed) and "station" (the open card's whole view). When the filters, the page or
// the open card change, the page reconnects with the new query. Everything from the network is put in the
// page with textContent, never as HTML. Element ids are documented in docs/dashboard.md.
"use strict";

const page = {
  query: { q: "", site: "", state: "", model: "", offset: 0, limit: 25 },
  card: null,              // "site/station" open on #/station/<site>/<station>, else null
  cardView: null,
  rows: new Map(),         // key -> row of the page shown
  total: 0,
  stream: null,
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
// A time of today as the time of day; an older one (a retained status days old) with its day, not read as today's
function clockTime(epoch) {
  if (!epoch) return "";
  const at = new Date(epoch * 1000);
  return at.toDateString() === new Date().toDateString() ? at.toLocaleTimeString() : at.toLocaleString();
}
function serverNow() { return Date.now() / 1000 + page.clockOffset; }

// ------------------------------------------------------------------ overview

const HEALTH = ["online", "stale", "offline", "unknown"];

function renderOverview(o) {
  page.clockOffset = o.server_time - Date.now() / 1000;
  const f = o.fleet;
  text($("#count-stations"), f.stations);
  for (const h of ["online", "stale", "offline", "degraded"]) text($(`#count-${h}`), f[h]);
  text($("#count-received"), o.counters.received);
  text($("#count-duplicates"), o.counters.duplicates);
  text($("#count-malformed"), o.counters.malformed);
  const broker = $("#broker-status");
  broker.dataset.connected = String(o.broker.connected);
  text(broker, o.broker.connected ? "broker: connected" : "broker: DISCONNECTED");
  broker.title = o.broker.detail || "";
  $("#no-stations").hidden = f.stations > 0;
  text($("#fleet-decided-hour"), f.decided_hour);
  text($("#fleet-lanes-hour"), lanes(f.lanes_hour));
  text($("#fleet-review-share"), pct(f.review_share_hour));
  text($("#fleet-review-hour"), `${f.review_hour} items`);
  text($("#fleet-lowconf"), pct(f.low_confidence_rate_hour));
  renderTrend($("#fleet-lowconf-trend"), f.low_confidence_rate_hour, f.low_confidence_rate_prev_hour);
  renderSpark($("#fleet-lowconf-chart"), f.low_confidence_series);
  text($("#fleet-alerts-hour"), f.alerts_hour);
  text($("#fleet-reasons"), Object.entries(f.reasons).filter(([, n]) => n).map(([c, n]) => `${n} ${c}`).join(", "));
  // each part is rebuilt only when its data changed, so what a reader (or a test) holds stays in place
  changed("sites", o.sites, () => renderSites(o.sites, o.sites_hidden));
  changed("hours", [f.decided_by_hour, f.review_by_hour], () => renderHours(f.decided_by_hour, f.review_by_hour, f.hour_starts));
  changed("models", o.models, () => renderModels(o.models));
  changed("rollout", o.rollout, () => renderProgress(o.rollout));
  changed("received", o.received_today, () => renderReceived(o.received_today));
  renderList($("#rollout-events"), o.rollout_events, rolloutItem);
  const sh = o.shipments;
  text($("#count-shipments-open"), sh.open);
  text($("#count-shipments-discrepant"), sh.open_with_discrepancies);
  $("#count-shipments-discrepant").dataset.count = String(sh.open_with_discrepancies);
  changed("shipments", [sh.listed, sh.open], () => renderShipments(sh));
  changed("shipments-closed", sh.closed_recent, () => renderClosedShipments(sh.closed_recent));
  changed("malformed", o.malformed, () => $("#malformed").replaceChildren(...o.malformed.map((m) =>
    el("li", { "data-topic": m.topic }, `${clockTime(m.at)} ${m.reason}`))));
  fillSelect($("#filter-site"), o.sites.map((s) => s.site), "every site");
  fillSelect($("#filter-model"), o.models.map((m) => m.version).filter((v) => v), "every model");
  document.body.dataset.version = String(o.version);
  if ($("#overview").dataset.ready !== "true") {
    $("#overview").dataset.ready = "true";
    // ms from navigation start to the first overview on screen (benchmarks/dashboard_browser.py reads it)
    document.body.dataset.firstViewMs = performance.now().toFixed(1);
  }
}

const memo = new Map();
function changed(key, data, render) {
  const json = JSON.stringify(data);
  if (memo.get(key) === json) return;
  memo.set(key, json);
  render();
}

function lanes(counts) {
  return Object.entries(counts || {}).sort((a, b) => b[1] - a[1]).map(([l, n]) => `${l} ${n}`).join(", ");
}

function renderTrend(node, now, before) {
  let trend = "none";
  if (now !== null && before !== null) trend = now > before * 1.1 + 0.005 ? "up" : now < before * 0.9 - 0.005 ? "down" : "flat";
  node.dataset.trend = trend;
  text(node, before === null ? "no figure for the hour before" : `hour before ${pct(before)} ${{ up: "↑", down: "↓", flat: "→" }[trend] || ""}`);
}

function renderSpark(svg, series) {
  const NS = "http://www.w3.org/2000/svg";
  const values = series.filter((v) => v !== null);
  const top = Math.min(1, Math.max(0.05, ...values) * 1.1);
  const pts = series.map((v, i) => [i, v]).filter(([, v]) => v !== null)
    .map(([i, v]) => `${((i / (series.length - 1)) * 120).toFixed(1)},${(22 - (v / top) * 20).toFixed(1)}`);
  const line = document.createElementNS(NS, "polyline");
  line.setAttribute("points", pts.join(" "));
  svg.replaceChildren(line);
  svg.dataset.points = String(pts.length);
}

function renderSites(sites, hidden) {
  const body = $("#sites").tBodies[0];
  const rows = sites.map((s) => {
    const tr = el("tr", { "data-site": s.site, "data-degraded": s.degraded });
    const cells = [s.site, s.stations, s.online, s.stale, s.offline, s.degraded, s.decided_hour,
                   pct(s.review_share_hour),
                   `${pct(s.low_confidence_rate_hour)} (${pct(s.low_confidence_rate_prev_hour)})`, s.alerts_hour];
    const names = ["site", "stations", "online", "stale", "offline", "degraded", "decided-hour", "review-share",
                   "lowconf", "alerts-hour"];
    cells.forEach((c, i) => tr.append(el("td", { "data-field": names[i] }, c)));
    tr.addEventListener("click", () => setQuery({ site: s.site, offset: 0 }));
    return tr;
  });
  body.replaceChildren(...rows);
  const note = $("#sites-hidden");
  note.hidden = !hidden;
  text(note, hidden ? `${hidden} more sites: search or filter the station list` : "");
}

function renderHours(decided, review, starts) {
  const box = $("#hours-today");
  const top = Math.max(1, ...decided);
  box.replaceChildren(...decided.map((n, i) => {
    const hour = new Date(starts[i] * 1000).getHours();
    const bar = el("div", { class: "bar", "data-hour": hour, "data-decided": n,
                            title: `${hour}:00 ${n} decided, ${review[i]} to review` });
    const fill = el("span", { class: "fill" });
    fill.style.height = `${(100 * n / top).toFixed(0)}%`;      // CSSOM: the page's CSP refuses style attributes
    bar.append(fill, el("span", { class: "tick" }, hour));
    return bar;
  }));
}

function renderModels(models) {
  $("#models").replaceChildren(...models.map((m) => {
    const li = el("li", { "data-version": m.version ?? "", "data-stations": m.stations },
                  `${m.name || "no model"} ${m.version || ""}: ${m.stations} station${m.stations === 1 ? "" : "s"} (${m.online} online)`);
    li.addEventListener("click", () => { if (m.version) setQuery({ model: m.version, offset: 0 }); });
    return li;
  }));
}

function renderProgress(r) {
  const box = $("#rollout-progress");
  box.hidden = !r;
  if (!r) { box.dataset.action = "none"; return; }
  box.dataset.action = r.action;
  box.dataset.ok = String(r.ok);
  box.dataset.share = String(r.share ?? "");
  text($(".action", box), r.action);
  text($(".model", box), `${r.model.name} ${r.model.version}`);
  text($(".outcome", box), r.ok ? "ok" : "FAILED");
  $(".fill", box).style.width = `${(100 * (r.share || 0)).toFixed(1)}%`;
  text($(".figures", box), `${r.stations_on_target} of ${r.stations_with_model} stations run ${r.model.version} (${pct(r.share)})`);
  text($(".reason", box), r.reason || "");
  $(".per-site", box).replaceChildren(...r.sites.map((s) =>
    el("li", { "data-site": s.site }, `${s.site}: ${s.on_target}/${s.stations}`)));
}

function renderReceived(r) {
  $("#received-today").tBodies[0].replaceChildren(...r.labels.map((l) => {
    const tr = el("tr", { "data-label": l.label, "data-count": l.count });
    tr.append(el("th", {}, l.label), el("td", {}, l.count));
    return tr;
  }));
  text($("#received-total"), r.total + (r.labels_hidden ? ` (${r.labels_hidden} labels not listed)` : ""));
}

function fillSelect(select, values, all) {
  const want = ["", ...new Set(values)].sort();
  const have = [...select.options].map((o) => o.value);
  if (select.value && !want.includes(select.value)) want.push(select.value);
  if (want.length === have.length && want.every((v, i) => v === have[i])) return;
  const keep = select.value;
  select.replaceChildren(...want.map((v) => el("option", { value: v }, v || all)));
  select.value = keep;
}

// ------------------------------------------------------------------ the station list

function rowItem(r) {
  const tr = el("tr", { class: "station-row", "data-station": r.key, "data-health": r.health,
                        "data-degraded": r.degraded, "data-reasons": r.reasons.join(" "),
                        "data-model-version": r.model_version ?? "" });
  const link = el("a", { href: `#/station/${encodeURIComponent(r.site)}/${encodeURIComponent(r.station)}` }, r.key);
  const name = el("td", { "data-field": "name" });
  name.append(link);
  tr.append(name, el("td", { "data-field": "health" }, r.health), el("td", { "data-field": "reason" }, r.reason || ""),
            el("td", { "data-field": "model-version" }, r.model_version || "–"),
            el("td", { "data-field": "decided-hour" }, r.decided_hour),
            el("td", { "data-field": "review-share" }, pct(r.review_share_hour)),
            el("td", { "data-field": "lowconf" }, pct(r.low_confidence_rate_hour)),
            el("td", { "data-field": "outbox" }, r.outbox_depth ?? "–"));
  return tr;
}

function renderPage(p) {
  const limit = page.query.limit;
  if (!p.stations.length && p.offset > 0 && p.offset === page.query.offset) {
    // the list shrank under this page (stations recovered, or were taken out of service): go to its last page
    // rather than show "51–50 of 30" over an empty table
    page.query.offset = Math.max(0, Math.ceil(p.total / limit) - 1) * limit;
    if (!page.card) reconnect();
    return;
  }
  page.rows = new Map(p.stations.map((r) => [r.key, r]));
  page.total = p.total;
  $("#stations").tBodies[0].replaceChildren(...p.stations.map(rowItem));
  const info = $("#page-info");
  info.dataset.total = String(p.total);
  info.dataset.offset = String(p.offset);
  text(info, p.total ? `${p.offset + 1}–${p.offset + p.stations.length} of ${p.total}` : "no station matches");
  $("#page-prev").disabled = p.offset === 0;
  $("#page-next").disabled = p.offset + p.stations.length >= p.total;
}

function renderRows(changed) {
  const body = $("#stations").tBodies[0];
  for (const r of changed.stations) {
    const old = body.querySelector(`tr[data-station="${CSS.escape(r.key)}"]`);
    if (!old) continue;
    page.rows.set(r.key, r);
    old.replaceWith(rowItem(r));
  }
}

function setQuery(change) {
  Object.assign(page.query, change);
  // the box keeps what is being typed (a trailing space before the next word) when it searches for the same
  if ($("#filter-q").value.trim() !== page.query.q) $("#filter-q").value = page.query.q;
  $("#filter-site").value = page.query.site;
  $("#filter-state").value = page.query.state;
  $("#filter-model").value = page.query.model;
  if (page.card) location.hash = "#/"; else reconnect();
}

// ------------------------------------------------------------------ one station's card

function renderCard(view) {
  if (view.error) {
    text($("#card-error"), view.error);
    $("#card").replaceChildren();
    document.body.dataset.card = "missing";
    return;
  }
  text($("#card-error"), "");
  page.cardView = view;
  let card = $("#card .station");
  if (!card || card.dataset.station !== view.key) {
    card = $("#station-template").content.firstElementChild.cloneNode(true);
    card.dataset.station = view.key;
    card.id = `station-${view.key.replace(/[^A-Za-z0-9_-]/g, "-")}`;
    $("#card").replaceChildren(card);
  }
  card.dataset.health = view.health;
  card.dataset.degraded = String(view.degraded);
  card.dataset.modelVersion = view.model ? view.model.version : "";
  text(field(card, "name"), view.key);
  text(field(card, "health"), view.health);
  text(field(card, "role"), view.role || "");
  field(card, "reasons").replaceChildren(...view.reasons.map((r) => el("li", { "data-code": r.code }, r.text)));
  const t = view.tally;
  text(field(card, "hour"), `${t.decided_hour} decided, ${pct(t.review_share_hour)} to review, ` +
       `${pct(t.low_confidence_rate_hour)} low-confidence frames (hour before ${pct(t.low_confidence_rate_prev_hour)}), ` +
       `${t.alerts_hour} QC alerts`);
  text(field(card, "lanes-hour"), lanes(t.lanes_hour) || "–");
  renderModel(card, view);
  renderCameras(card, view.cameras_up || {});
  renderUpdate(card, view.last_model_update);
  renderRolloutFact(card, view.rollout);
  renderShipmentFact(card, view.shipment);
  renderStats(card, view);
  renderChart(field(card, "lowconf-chart"), view.history || [], card);
  renderList(field(card, "results"), view.results, resultItem);
  renderList(field(card, "decisions"), view.decisions, decisionItem);
  renderList(field(card, "alerts"), view.alerts, alertItem);
  renderUptime(card, view);
  document.body.dataset.card = view.key;
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
  // status.v1 lets an agent leave out what it runs (running: {}) and why it refused (reason: null)
  const running = update.running && update.running.version ? String(update.running.version) : "?";
  text(box, update.ok ? `installed ${running} at ${clockTime(update.ts)}`
                      : `rejected at ${clockTime(update.ts)}, still running ${running}: ${update.reason || "the station gave no reason"}`);
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
    // a retained offline status (what a started dashboard gets) may be a last will, which carries the time of
    // the connect it was set at: the station went offline then or later
    text(box, view.status_time_from && view.status_time_from !== "arrival"
      ? `offline (last status ${clockTime(view.status_at)})`
      : `offline since ${clockTime(view.status_at ?? view.status_received_at)}`);
  } else if (view.uptime_s !== null && view.uptime_s !== undefined && (view.status_at ?? view.status_received_at)) {
    // status_at: when the status was sent (a retained one after a restart is older than its arrival)
    text(box, duration(view.uptime_s + serverNow() - (view.status_at ?? view.status_received_at)));
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

function rolloutItem(e) {
  const li = el("li", { class: "rollout-event", "data-id": e.id, "data-action": e.action, "data-ok": e.ok,
                        "data-model-version": e.model.version });
  const head = el("div", { class: "head" });
  head.append(el("span", { class: "action" }, e.action), el("span", { class: "model" }, `${e.model.name} ${e.model.version}`),
              el("span", { class: "outcome" }, e.ok ? "ok" : "FAILED"));
  li.append(head);
  if (e.reason) li.append(el("div", { class: "reason" }, e.reason));
  // the overview names the first stations of a big rollout; stations_total counts them all
  const more = (e.stations_total ?? e.stations.length) - e.stations.length;
  if (e.stations.length) li.append(el("div", { class: "stations" }, e.stations.join(", ") + (more > 0 ? ` and ${more} more` : "")));
  const figures = Object.entries(e.figures || {}).filter(([, v]) => typeof v === "number" || typeof v === "string");
  if (figures.length) {
    li.append(el("div", { class: "figures" }, figures.map(([k, v]) => `${k} ${typeof v === "number" ? Number(v.toFixed(4)) : v}`).join(", ")));
  }
  li.append(el("div", { class: "when" }, e.ts));
  return li;
}

// A shipment's discrepancies in one line: "over 1, short 1, unexpected 1, review 1, unknown 1" (the non-zero ones).
// An open shipment's short lines are still arriving ("N still expected"), not a discrepancy until it closes.
function discrepancies(totals, open) {
  const kinds = open ? ["over", "unexpected", "review", "unknown"] : ["over", "short", "unexpected", "review", "unknown"];
  const parts = kinds.filter((k) => totals[k]).map((k) => `${k} ${totals[k]}`);
  const text = parts.length ? parts.join(", ") : "no discrepancies";
  return open && totals.short ? `${text}; ${totals.short} still expected` : text;
}

function shipmentLine(l) {
  const n = l.status === "over" ? `+${l.over}` : l.status === "short" ? `−${l.short}` : `+${l.unexpected}`;
  return el("li", { "data-label": l.label, "data-status": l.status },
            `${l.label}: ${l.status} ${n} (expected ${l.expected}, received ${l.received})`);
}

function shipmentItem(s) {
  const li = el("li", { class: "shipment", "data-id": s.key, "data-station": s.station, "data-shipment": s.shipment,
                        "data-state": s.state, "data-discrepant": s.discrepant,
                        title: `opened ${clockTime(s.opened_at)}, last receipt ${clockTime(s.ts)} (seq ${s.seq})` });
  const head = el("div", { class: "head" });
  head.append(el("a", { href: `#/station/${s.station}`, class: "station-link" }, s.station),
              el("span", { class: "name" }, ` ${s.shipment}`),
              el("span", { class: "items" }, ` ${s.items} items of ${s.expected_total} expected`));
  li.append(head, el("div", { class: "totals", "data-field": "totals" }, discrepancies(s.totals, s.state === "open")));
  if (s.vouched_count) {
    li.append(el("div", { class: "vouched muted", "data-field": "vouched", "data-count": String(s.vouched_count),
                          title: "received on an expected line though scored beyond the unknown threshold: the shipment vouched for them" },
                 `${s.vouched_count} vouched for by the shipment`));
  }
  if (s.lines.length) {
    const lines = el("ul", { class: "lines" });
    lines.append(...s.lines.map(shipmentLine));
    if (s.lines_left_off) lines.append(el("li", { class: "muted" }, `… ${s.lines_left_off} more lines`));
    li.append(lines);
  }
  return li;
}

// As the server lists them: those that need attention first (discrepant, the most wrong items first, held still),
// then the newest receipts; at a thousand docks the newest alone would change at every push.
function renderShipments(sh) {
  $("#shipments").replaceChildren(...sh.listed.map(shipmentItem));
  $("#no-shipments").hidden = sh.listed.length > 0;
  const hidden = sh.hidden, more = $("#shipments-hidden");
  more.hidden = !hidden;
  text(more, hidden ? `${hidden} more open shipments (GET /api/shipments lists the ${sh.open_listed} newest in full)` : "");
}

// The final receipts of the most recently closed shipments: what a dock claims against (short lines count now).
function renderClosedShipments(closed) {
  $("#shipments-closed").replaceChildren(...closed.map(shipmentItem));
  $("#shipments-closed-title").hidden = closed.length === 0;
}

function renderShipmentFact(card, s) {
  const node = field(card, "shipment");
  node.dataset.discrepant = s ? String(s.discrepant) : "none";
  text(node, s ? `${s.shipment}: ${s.items} items of ${s.expected_total} expected, ${discrepancies(s.totals, s.state === "open")}` +
              (s.vouched_count ? `; ${s.vouched_count} vouched for` : "") : "none open");
}

// ------------------------------------------------------------------ routes and the stream

function decoded(part) {
  try { return decodeURIComponent(part); } catch (err) { return null; }   // a mangled link: no card, not a dead page
}

function route() {
  const m = /^#\/station\/([^/]+)\/([^/]+)$/.exec(location.hash);
  const site = m && decoded(m[1]), station = m && decoded(m[2]);
  page.card = site && station ? `${site}/${station}` : null;
  $("#card-section").hidden = !page.card;
  $("#overview").hidden = !!page.card;
  $("#station-list").hidden = !!page.card;
  if (!page.card) {
    $("#card").replaceChildren();
    page.cardView = null;
    document.body.dataset.card = "";
  }
  reconnect();
}

function streamUrl() {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(page.query)) if (v !== "" && v !== null) params.set(k, String(v));
  if (page.card) params.set("station", page.card);
  return `/events?${params}`;
}

// EventSource does not tell what an HTTP error answered: ask the stream's URL once more and say it. The server's
// own errors are JSON ({"error": ...}); anything else came from something in between (nginx's HTML 502 or 504
// page while the dashboard is down or slow), said as its status and the start of its text, never as markup.
// "" when it streams now (the next try will open) or cannot be reached at all.
async function whyRefused(url) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 10000);
  try {
    const resp = await fetch(url, { headers: { Accept: "text/event-stream" }, cache: "no-store",
                                    signal: abort.signal });
    if (resp.ok) return "";
    const said = await startOf(resp, 20000);
    if (/^application\/json\b/i.test(resp.headers.get("Content-Type") || "")) {
      let error = null;
      try { error = JSON.parse(said).error; } catch (err) { /* cut short: said as text below */ }
      if (typeof error === "string") return `HTTP ${resp.status}: ${error.slice(0, 300)}`;
    }
    const plain = said.replace(/<(script|style)\b[\s\S]*?<\/\1\s*>/gi, " ").replace(/<[^>]*>?/g, " ")
      .replace(/\s+/g, " ").trim().slice(0, 200);
    return `HTTP ${resp.status} from a proxy or server in between${plain ? `: ${plain}` : ""}`;
  } catch (err) {
    return "";
  } finally {
    clearTimeout(timer);
    abort.abort();          // a stream that opened meanwhile is let go at once
  }
}

// The first ``limit`` characters of an answer's body, read no further.
async function startOf(resp, limit) {
  const reader = resp.body.getReader(), decoder = new TextDecoder();
  let said = "";
  while (said.length < limit) {
    const { done, value } = await reader.read();
    if (done) break;
    said += decoder.decode(value, { stream: true });
  }
  reader.cancel().catch(() => {});
  return said.slice(0, limit);
}

let retryDelay = 2000;          // after an HTTP error the browser gives up on the stream: the page retries itself
let retryTimer = null;

function reconnect() {
  clearTimeout(retryTimer);
  if (page.stream) page.stream.close();
  const stream = new EventSource(streamUrl());
  page.stream = stream;
  const status = $("#stream-status");
  const on = (name, fn) => stream.addEventListener(name, (msg) => {
    if (page.stream !== stream) return;
    try { fn(JSON.parse(msg.data)); } catch (err) { console.error(`dashboard: bad ${name} event`, err); }
  });
  document.body.dataset.stream = "connecting";
  stream.onopen = () => {
    status.dataset.connected = "true";
    text(status, "live");
    document.body.dataset.stream = "open";
    retryDelay = 2000;
  };
  stream.onerror = () => {
    if (page.stream !== stream) return;
    status.dataset.connected = "false";
    document.body.dataset.stream = "reconnecting";
    if (stream.readyState !== EventSource.CLOSED) {       // a network error: the browser retries on its own
      text(status, "live: reconnecting…");
      return;
    }
    // an HTTP answer (503: too many pages open, 401 after a restart, a proxy's 502): the browser will not retry
    const wait = retryDelay * (0.75 + Math.random() / 2);
    retryDelay = Math.min(retryDelay * 2, 30000);
    const retrying = `retrying in ${Math.round(wait / 1000)} s`;
    text(status, `live: disconnected, ${retrying}`);
    retryTimer = setTimeout(reconnect, wait);
    whyRefused(stream.url).then((why) => {
      if (why && page.stream === stream) text(status, `live: disconnected (${why}), ${retrying}`);
    });
  };
  on("overview", renderOverview);
  on("stations", renderPage);
  on("rows", renderRows);
  on("station", renderCard);
}

// Enter in the search box searches at once (the page's CSP runs no inline handler: the form is held here)
$("#filters").addEventListener("submit", (e) => {
  e.preventDefault();
  clearTimeout(typing);
  setQuery({ q: $("#filter-q").value.trim(), offset: 0 });
});
let typing = null;
$("#filter-q").addEventListener("input", (e) => {
  clearTimeout(typing);
  typing = setTimeout(() => setQuery({ q: e.target.value.trim(), offset: 0 }), 250);
});
for (const name of ["site", "state", "model"]) {
  $(`#filter-${name}`).addEventListener("change", (e) => setQuery({ [name]: e.target.value, offset: 0 }));
}
$("#page-prev").addEventListener("click", () => setQuery({ offset: Math.max(0, page.query.offset - page.query.limit) }));
$("#page-next").addEventListener("click", () => setQuery({ offset: page.query.offset + page.query.limit }));
window.addEventListener("hashchange", route);

setInterval(() => {
  const card = $("#card .station");
  if (card && page.cardView) renderUptime(card, page.cardView);
}, 1000);

route();
