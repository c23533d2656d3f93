"use strict";
// The dlopbox dashboard: signs in with the read token (POST /session sets an HttpOnly cookie),
// then listens to GET /live (server-sent events) and reads /master and /events with the cookie.
// Everything from the server is shown with textContent: paths may hold any character.

const FEED_ROWS = 100, HISTORY_PAGE = 50, SERIES = 60;
const COLORS = ["#0b62a4", "#c62828", "#1a7f37", "#b35900", "#6a1b9a", "#00838f", "#5d4037", "#ad1457"];
const SLAVE_COLUMNS = ["slave", "state", "seq", "lag", "lag (s)", "queued", "last seen", "rate"];
const $ = (id) => document.getElementById(id);

const state = {
  source: null, paused: false, held: [], heldCount: 0, clients: new Map(), lag: new Map(),
  masterTimer: null, history: {prefix: "", since: 0, next: null},
};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function clock(seconds) {
  if (!seconds) return "";
  const d = new Date(seconds * 1000);
  return d.toLocaleTimeString([], {hour12: false}) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function ago(iso) {
  if (!iso) return "never";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  return s < 120 ? `${s} s ago` : s < 7200 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
}

function badge(id, text, kind) {
  const node = $(id);
  node.textContent = text;
  node.className = "badge " + (kind || "");
}

// -- sign-in ------------------------------------------------------------------------------

async function start() {
  $("signin").addEventListener("submit", signIn);
  $("signout").addEventListener("click", signOut);
  $("pause").addEventListener("click", togglePause);
  $("history-form").addEventListener("submit", (e) => { e.preventDefault(); lookUp($("history-prefix").value.trim(), 0); });
  $("history-first").addEventListener("click", () => lookUp(state.history.prefix, 0));
  $("history-next").addEventListener("click", () => lookUp(state.history.prefix, state.history.next));
  const r = await fetch("/session", {credentials: "same-origin", cache: "no-store"});
  if (r.ok) showDashboard(); else showSignIn("");
}

function showSignIn(message) {
  stop();
  $("dashboard").hidden = true;
  $("badges").hidden = true;
  $("signin-view").hidden = false;
  $("signin-error").textContent = message;
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const input = $("token");
  $("signin-error").textContent = "";
  let r;
  try {
    r = await fetch("/session", {method: "POST", credentials: "same-origin", headers: {"Content-Type": "application/json"},
                                 body: JSON.stringify({token: input.value})});
  } catch (err) {
    $("signin-error").textContent = "the interface cannot be reached: " + err;
    return;
  }
  input.value = "";
  if (r.status === 204) { showDashboard(); return; }
  let message = `refused (${r.status})`;
  try { message = (await r.json()).error || message; } catch (err) { /* not JSON */ }
  $("signin-error").textContent = message;
  input.focus();
}

async function signOut() {
  await fetch("/session", {method: "DELETE", credentials: "same-origin"});
  showSignIn("signed out");
}

function showDashboard() {
  $("signin-view").hidden = true;
  $("dashboard").hidden = false;
  $("badges").hidden = false;
  connect();
  readMaster();
  state.masterTimer = setInterval(readMaster, 2000);
}

function stop() {
  if (state.source) state.source.close();
  state.source = null;
  clearInterval(state.masterTimer);
}

// -- the push channel ---------------------------------------------------------------------

function connect() {
  const source = state.source = new EventSource("/live");
  source.addEventListener("open", () => badge("conn", "live", "ok"));
  source.addEventListener("error", async () => {
    badge("conn", "reconnecting", "warn");
    if (source.readyState === EventSource.CLOSED) {
      const r = await fetch("/session", {credentials: "same-origin", cache: "no-store"}).catch(() => null);
      if (r && r.status === 401) showSignIn("your session ended: sign in again");
      else setTimeout(() => { if (state.source === source) connect(); }, 2000);
    }
  });
  source.addEventListener("events", (e) => onEvents(JSON.parse(e.data)));
  source.addEventListener("gap", (e) => onGap(JSON.parse(e.data)));
  source.addEventListener("client", (e) => { const c = JSON.parse(e.data); mergeClient(c); renderClients(); });
  source.addEventListener("status", (e) => onStatus(JSON.parse(e.data)));
}

function eventRow(ev, fresh) {
  const path = ev.dest ? `${ev.path} → ${ev.dest}` : ev.path;
  return el("tr", {"data-seq": ev.seq, "class": fresh ? "fresh" : ""},
            el("td", {class: "num"}, ev.seq), el("td", {}, clock(ev.ts)), el("td", {class: "op"}, ev.op),
            el("td", {class: "path"}, path), el("td", {class: "num"}, ev.op === "write" ? bytes(ev.size) : ""));
}

function showLast(last) {
  $("m-last").textContent = last ? `${last.op} ${last.path} (seq ${last.seq}, ${clock(last.at)})` : "none since the interface started";
}

function onEvents(msg) {
  $("m-head").textContent = msg.last_seq;
  const tail = msg.events[msg.events.length - 1];
  if (tail) showLast({op: tail.op, path: tail.path, seq: tail.seq, at: msg.at});
  const rows = msg.events.map((ev) => eventRow(ev, true)).reverse();
  const hidden = msg.count - msg.events.length;
  if (hidden > 0) rows.push(el("tr", {class: "more"}, el("td", {colspan: 5}, `… and ${hidden} earlier events of this batch (seq ${msg.first_seq}–${msg.first_seq + hidden - 1})`)));
  if (state.paused) {
    state.heldCount += msg.count;
    state.held.unshift(...rows);
    state.held.length = Math.min(state.held.length, FEED_ROWS);
    $("feed-note").textContent = `paused: ${state.heldCount} new events waiting`;
    return;
  }
  addFeedRows(rows);
}

function onGap(msg) {
  addFeedRows([el("tr", {class: "more"}, el("td", {colspan: 5}, `seq ${msg.first_seq}–${msg.last_seq} happened while this tab was away: see the history below`))]);
}

function addFeedRows(rows) {
  const body = $("feed-rows");
  body.prepend(...rows);
  while (body.rows.length > FEED_ROWS) body.deleteRow(-1);
}

function togglePause() {
  state.paused = !state.paused;
  $("pause").textContent = state.paused ? "Resume" : "Pause";
  if (!state.paused) {
    addFeedRows(state.held);
    state.held = [];
    state.heldCount = 0;
    $("feed-note").textContent = "";
  } else {
    $("feed-note").textContent = "paused";
  }
}

function onStatus(s) {
  badge("mongodb", "MongoDB " + s.mongodb, s.mongodb === "ok" ? "ok" : "bad");
  badge("rabbitmq", "RabbitMQ " + s.rabbitmq, s.rabbitmq === "ok" ? "ok" : "bad");
  badge("log", s.log_degraded ? `log degraded (logged through ${s.logged})` : "log ok", s.log_degraded ? "warn" : "ok");
  $("m-rate").textContent = s.events_per_minute;
  $("m-head").textContent = s.head;
  showLast(s.last_event);
  const seen = new Set();
  for (const c of s.clients) { mergeClient(c); seen.add(c.id); }
  for (const id of [...state.clients.keys()]) if (!seen.has(id)) state.clients.delete(id);
  for (const c of s.clients) {
    const series = state.lag.get(c.id) || [];
    series.push(c.lag);
    if (series.length > SERIES) series.shift();
    state.lag.set(c.id, series);
  }
  for (const id of [...state.lag.keys()]) if (!seen.has(id)) state.lag.delete(id);
  renderClients();
  drawChart($("chart-events"), [{values: s.events_per_second, color: COLORS[0]}]);
  const lines = [...state.lag.entries()].map(([id, values], i) => ({id, values, color: COLORS[i % COLORS.length]}));
  drawChart($("chart-lag"), lines);
  $("lag-legend").replaceChildren(...lines.map((l) => el("li", {}, legendSwatch(l.color), l.id)));
}

function legendSwatch(color) {
  const i = el("i", {});
  i.style.background = color;
  return i;
}

function mergeClient(c) {
  const known = state.clients.get(c.id) || {};
  state.clients.set(c.id, {...known, ...Object.fromEntries(Object.entries(c).filter(([, v]) => v !== undefined))});
}

function renderClients() {
  const body = $("slave-rows");
  const clients = [...state.clients.values()].sort((a, b) => a.id.localeCompare(b.id));
  $("slave-count").textContent = `(${clients.length})`;
  if (!clients.length) {
    body.replaceChildren(el("tr", {class: "empty"}, el("td", {colspan: 8}, "no slave has reported yet")));
    return;
  }
  body.replaceChildren(...clients.map(clientRow));
}

function clientRow(c) {
  const stateCell = el("td", {class: "state " + c.state.replace(/ /g, "-")}, c.state);
  if (c.state === "syncing" && c.complete !== null && c.complete !== undefined) {
    const pct = Math.floor(c.complete * 100);
    stateCell.textContent = `syncing ${pct}%`;
    const bar = el("span", {class: "bar"}, el("i", {}));
    bar.firstChild.style.width = pct + "%";
    stateCell.append(bar);
  }
  if (c.state === "local differences" && c.local_differences) stateCell.textContent = `${c.local_differences} local differences`;
  const lagSeconds = c.lag_seconds === null || c.lag_seconds === undefined ? "?" : c.lag_seconds.toFixed(1);
  const queued = c.queued === null || c.queued === undefined ? "not reported" : c.queued;
  const cells = [el("td", {class: "id"}, c.id), stateCell, el("td", {class: "num"}, c.seq), el("td", {class: "num"}, c.lag),
                 el("td", {class: "num"}, lagSeconds), el("td", {class: "num"}, queued), el("td", {}, ago(c.last_seen)),
                 el("td", {class: "num"}, c.rate ? bytes(Math.round(c.rate)) + "/s" : "idle")];
  SLAVE_COLUMNS.forEach((label, i) => cells[i].setAttribute("data-label", label));
  return el("tr", {"data-client": c.id, "data-state": c.state, "data-seq": c.seq}, ...cells);
}

function drawChart(node, lines) {
  const width = 300, height = 60;
  let max = 1;
  for (const l of lines) for (const v of l.values) max = Math.max(max, v);
  const children = [svg("text", {x: 4, y: 11, "font-size": 9, fill: "#5f6b7a"})];
  children[0].textContent = `max ${max}`;
  for (const l of lines) {
    const n = l.values.length;
    if (!n) continue;
    const step = width / Math.max(1, SERIES - 1);
    const offset = (SERIES - n) * step;
    const points = l.values.map((v, i) => `${(offset + i * step).toFixed(1)},${(height - 2 - (v / max) * (height - 14)).toFixed(1)}`);
    children.push(svg("polyline", {points: points.join(" "), stroke: l.color}));
  }
  node.replaceChildren(...children);
}

// -- the master (GET /master, reported by the watcher) ------------------------------------

async function readMaster() {
  let r;
  try { r = await fetch("/master", {credentials: "same-origin", cache: "no-store"}); } catch (err) { return; }
  const list = $("m-unsendable-list");
  if (!r.ok) {
    const text = r.status === 404 ? "not reported" : `unavailable (${r.status})`;
    for (const id of ["m-dirs", "m-rescans", "m-unsendable"]) $(id).textContent = text;
    list.replaceChildren();
    return;
  }
  const m = await r.json();
  $("m-dirs").textContent = `${m.watched_dirs} directories`;
  $("m-rescans").textContent = m.rescans;
  const total = m.unsendable_total ?? m.unsendable.length;
  $("m-unsendable").textContent = total ? `${total}` : "none";
  list.replaceChildren(...m.unsendable.slice(0, 20).map((u) => el("li", {}, `${u.path}: ${u.reason}`)));
}

// -- the history of a path (GET /events?prefix=) ------------------------------------------

async function lookUp(prefix, since) {
  const query = new URLSearchParams({since: String(since), limit: String(HISTORY_PAGE)});
  if (prefix) query.set("prefix", prefix);
  const note = $("history-note");
  note.textContent = "looking up…";
  const r = await fetch("/events?" + query, {credentials: "same-origin", cache: "no-store"});
  let body;
  try { body = await r.json(); } catch (err) { body = {}; }
  if (!r.ok) {
    note.textContent = body.error || `refused (${r.status})`;
    return;
  }
  state.history = {prefix, since, next: body.events.length === HISTORY_PAGE ? body.next : null};
  $("history-rows").replaceChildren(...body.events.map((ev) => eventRow(ev, false)));
  const what = prefix ? `“${prefix}”` : "every path";
  note.textContent = body.events.length
    ? `${what}: seq ${body.events[0].seq}–${body.events[body.events.length - 1].seq}` + (state.history.next ? " (more on the next page)" : " (end of the log)")
    : `${what}: no events` + (since ? " after seq " + since : "");
  $("history-first").disabled = since === 0;
  $("history-next").disabled = state.history.next === null;
}

document.addEventListener("DOMContentLoaded", start);
