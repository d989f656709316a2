// flowtrace live page: recent runs from GET api/pipelines, then live from WS /ws/*.
// No framework, no build step. Everything that comes from the server reaches the DOM
// through textContent or setAttribute: never through innerHTML.
"use strict";

const MAX_RUNS = 100;
const POLL_MS = 2000;
const RECONNECT_MS = [500, 1000, 2000, 4000];
const RENDER_MS = 100;
const EVENT_TYPES = new Set(["PipelineStartEvent", "StepStartEvent", "StepProgressEvent",
  "StepCompleteEvent", "StepErrorEvent", "PipelineCompleteEvent", "PipelineErrorEvent"]);
const TERMINAL = new Set(["COMPLETED", "FAILED", "LOST"]);
// What a WebSocket subprotocol may be (an RFC 7230 token): base64's "/" and "=" may not.
const SUBPROTOCOL = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

// ?token= (URL-encoded). A bare "+" stays a "+": tokens have no spaces, base64 ones have "+".
const token = new URLSearchParams(location.search.replaceAll("+", "%2B")).get("token");
// The gateway takes the token as `Sec-WebSocket-Protocol: bearer, <token>` or as ?token=.
const tokenAsSubprotocol = Boolean(token) && SUBPROTOCOL.test(token);
const runs = new Map();        // pipeline_id -> run (SPEC §6 run state, times in ms)
const forgotten = new Set();   // pruned runs: their late events are ignored
const expanded = new Set();    // pipeline ids whose details are open
const rows = new Map();        // pipeline_id -> <tbody>
const dirty = new Set();
let renderTimer = 0;
let pressed = false;           // a mouse button is down: rows stay in place until it is up
let traceUrl = null;

const conn = {
  ws: null, lastId: null, attempt: 0, buffer: null, pollTimer: 0, reconnectTimer: 0,
  closedWith: "", downDetail: "", refused: false,
};

// ---------------------------------------------------------------- state

const ms = (iso) => (iso ? Date.parse(iso) : null);
const isTerminal = (run) => TERMINAL.has(run.status);

function newStep(index, name) {
  return { index, name: name || "", status: "PENDING", attempt: 0, started_at: null,
    finished_at: null, duration_ms: null, done: null, total: null, error: null };
}

function stepOf(run, index, name) {
  while (run.steps.length <= index) run.steps.push(newStep(run.steps.length));
  const step = run.steps[index];
  if (name && !step.name) step.name = name;
  return step;
}

function fromRest(state) {
  return {
    pipeline_id: state.pipeline_id, pipeline_name: state.pipeline_name || "",
    pipeline_type: state.pipeline_type, status: state.status,
    started_at: ms(state.started_at), finished_at: ms(state.finished_at),
    duration_ms: state.duration_ms, trace_id: state.trace_id, total_steps: state.total_steps,
    error: state.error, result: state.status === "COMPLETED" ? state.result : undefined,
    steps: (state.steps || []).map((s) => ({ ...newStep(s.index, s.name), ...s,
      started_at: ms(s.started_at), finished_at: ms(s.finished_at) })),
  };
}

// Merge run states from REST or a snapshot. A finished run never goes back to running;
// what only events carry (results, step errors) is kept.
function mergeState(state) {
  const id = state.pipeline_id;
  if (forgotten.has(id)) return;
  const local = runs.get(id);
  if (local && isTerminal(local)) return;
  const run = fromRest(state);
  if (local) {
    if (run.result === undefined) run.result = local.result;
    for (const step of run.steps) {
      const old = local.steps[step.index];
      if (old && old.error && step.status !== "COMPLETED") step.error = old.error;
    }
  }
  runs.set(id, run);
  touch(id);
}

function applyEvent(ev) {
  const id = ev.pipeline_id;
  if (typeof id !== "string" || forgotten.has(id)) return;
  const at = ms(ev.timestamp) || Date.now();
  let run = runs.get(id);
  if (!run) {
    run = { pipeline_id: id, pipeline_name: ev.pipeline_name || "", pipeline_type: ev.pipeline_type,
      status: "RUNNING", started_at: at, finished_at: null, duration_ms: null,
      trace_id: ev.trace_id || null, total_steps: null, error: null, result: undefined, steps: [] };
    runs.set(id, run);
  } else if (isTerminal(run)) {
    return; // late event of a finished run (as the gateway's run store does)
  }
  if (ev.pipeline_name && !run.pipeline_name) run.pipeline_name = ev.pipeline_name;
  if (ev.trace_id && !run.trace_id) run.trace_id = ev.trace_id;
  switch (ev.type) {
    case "PipelineStartEvent":
      run.started_at = at;
      if (ev.pipeline_name) run.pipeline_name = ev.pipeline_name;
      run.pipeline_type = ev.pipeline_type;
      run.total_steps = ev.total_steps;
      (ev.steps || []).forEach((name, i) => stepOf(run, i, name));
      if (ev.total_steps > 0) stepOf(run, ev.total_steps - 1);
      break;
    case "StepStartEvent": {
      const step = stepOf(run, ev.step_index, ev.step_name);
      Object.assign(step, { status: "RUNNING", attempt: ev.attempt, started_at: at,
        finished_at: null, duration_ms: null });
      break;
    }
    case "StepProgressEvent": {
      const step = stepOf(run, ev.step_index, ev.step_name);
      step.done = ev.done;
      step.total = ev.total;
      break;
    }
    case "StepCompleteEvent":
    case "StepErrorEvent": {
      const step = stepOf(run, ev.step_index, ev.step_name);
      const failed = ev.type === "StepErrorEvent";
      step.status = !failed ? "COMPLETED" : ev.will_retry ? "RETRYING" : "FAILED";
      step.attempt = Math.max(step.attempt, ev.attempt);
      step.finished_at = at;
      step.duration_ms = ev.duration_ms;
      step.error = failed ? ev.error : null;
      break;
    }
    case "PipelineCompleteEvent":
      finish(run, "COMPLETED", at, ev.duration_ms, null);
      run.result = ev.result;
      break;
    case "PipelineErrorEvent":
      if (ev.status === "FAILED" && Number.isInteger(ev.failed_step_index)) {
        const step = stepOf(run, ev.failed_step_index, ev.failed_step);
        if (["PENDING", "RUNNING", "RETRYING"].includes(step.status)) step.status = "FAILED";
      }
      finish(run, ev.status || "FAILED", at, ev.duration_ms, ev.error);
      break;
  }
  touch(id);
}

function finish(run, status, at, durationMs, error) {
  Object.assign(run, { status, finished_at: at, duration_ms: durationMs, error });
}

function prune() {
  if (runs.size <= MAX_RUNS) return;
  for (const run of sortedRuns().slice(MAX_RUNS)) {
    drop(run.pipeline_id);
    forgotten.add(run.pipeline_id);
  }
  if (forgotten.size > 10 * MAX_RUNS) forgotten.clear();
}

function drop(id) {
  runs.delete(id);
  expanded.delete(id);
  rows.get(id)?.remove();
  rows.delete(id);
}

const sortedRuns = () => [...runs.values()].sort((a, b) =>
  (b.started_at || 0) - (a.started_at || 0) || (a.pipeline_id < b.pipeline_id ? -1 : 1));

// ---------------------------------------------------------------- rendering

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function touch(id) {
  dirty.add(id);
  scheduleRender();
}

function scheduleRender() {
  if (!renderTimer) renderTimer = setTimeout(render, RENDER_MS);
}

function render() {
  renderTimer = 0;
  prune();
  for (const id of dirty) {
    const run = runs.get(id);
    if (run) renderRun(run);
  }
  dirty.clear();
  if (!pressed) placeRows();
  renderSummary();
}

// Newest first. Not while a button is down: new runs arriving at the top would move the
// rows, and a press and its release would land on different ones (no click).
function placeRows() {
  let previous = document.getElementById("runs").tHead;
  for (const run of sortedRuns()) {
    const row = rows.get(run.pipeline_id);
    if (previous.nextSibling !== row) previous.after(row);
    previous = row;
  }
}

// A run's rows are built anew, then morphed into the ones on the page: the elements there
// stay, so a press and its release land on the same one (a click), selections and focus last.
function renderRun(run) {
  const open = expanded.has(run.pipeline_id);
  const model = el("tbody", { class: open ? "run open" : "run", "data-testid": "run",
      "data-run-id": run.pipeline_id, "data-status": run.status, "data-name": run.pipeline_name },
    summaryRow(run, open), open && detailsRow(run));
  const body = rows.get(run.pipeline_id);
  if (body) morph(body, model); else rows.set(run.pipeline_id, model);
}

// Make `node` like `model`, changing only what differs.
function morph(node, model) {
  for (const name of node.getAttributeNames()) {
    if (!model.hasAttribute(name)) node.removeAttribute(name);
  }
  for (const name of model.getAttributeNames()) {
    const value = model.getAttribute(name);
    if (node.getAttribute(name) !== value) node.setAttribute(name, value);
  }
  const wanted = [...model.childNodes];
  wanted.forEach((child, i) => {
    const have = node.childNodes[i];
    if (!have) node.append(child);
    else if (have.nodeType === Node.TEXT_NODE && child.nodeType === Node.TEXT_NODE) {
      if (have.data !== child.data) have.data = child.data;
    } else if (have.nodeType === Node.ELEMENT_NODE && have.nodeName === child.nodeName) {
      morph(have, child);
    } else {
      have.replaceWith(child);
    }
  });
  while (node.childNodes.length > wanted.length) node.lastChild.remove();
}

// One listener on the table, whatever rows come and go.
function onRunsClick(e) {
  const row = e.target.closest("tr.summary-row");
  if (!row || e.target.closest("a")) return;
  const id = row.parentElement.dataset.runId;
  if (expanded.has(id)) expanded.delete(id); else expanded.add(id);
  touch(id);
}

function summaryRow(run, open) {
  const id = run.pipeline_id;
  const toggle = el("button", { type: "button", class: "toggle", "data-testid": "run-toggle",
    "aria-expanded": String(open), "aria-label": `details of ${run.pipeline_name} run ${id}`,
    text: open ? "▾" : "▸" });
  return el("tr", { class: "summary-row" },
    el("td", { class: "col-toggle" }, toggle),
    el("td", { class: "name" },
      el("span", { "data-testid": "run-name", text: run.pipeline_name || "(unnamed)" }),
      el("span", { class: "run-id", title: id, text: id.slice(0, 8) })),
    el("td", {}, badge(run.status, "run-status")),
    el("td", {}, stepDots(run)),
    el("td", { class: "num", "data-testid": "run-duration", text: formatMs(runDuration(run)) }),
    el("td", { class: "num", "data-testid": "run-started", title: isoOf(run.started_at),
      text: clockOf(run.started_at) }),
    outcomeCell(run),
    el("td", {}, traceLink(run)));
}

function outcomeCell(run) {
  if (run.error) {
    return el("td", { class: "outcome error", "data-testid": "run-error", title: run.error,
      text: run.error });
  }
  const text = run.result === undefined ? "" : preview(run.result);
  return el("td", { class: "outcome", "data-testid": "run-result", title: text, text });
}

function stepDots(run) {
  const total = run.total_steps || run.steps.length;
  const done = run.steps.filter((s) => s.status === "COMPLETED").length;
  const dots = el("span", { class: "dots", "aria-hidden": "true" });
  for (const step of run.steps) dots.append(el("span", { class: `dot s-${step.status}` }));
  return el("span", { class: "steps", "data-testid": "run-steps" },
    dots, el("span", { class: "count", text: `${done}/${total}` }));
}

function detailsRow(run) {
  const start = run.started_at;
  const end = run.finished_at || Math.max(runClock(run), ...run.steps.map((s) => s.finished_at || 0));
  const span = Math.max(1, (end || 0) - (start || 0));
  const steps = el("table", { class: "steps-table", "data-testid": "steps" },
    el("thead", {}, el("tr", {}, ...["#", "Step", "Status", "Attempt", "Duration", "Items",
      `Timeline (0 – ${formatMs(span)})`].map((h) => el("th", { text: h })))));
  const body = el("tbody");
  for (const step of run.steps) body.append(stepRow(run, step, start, span));
  steps.append(body);
  const facts = el("dl", { class: "facts" },
    el("dt", { text: "run id" }), el("dd", { text: run.pipeline_id }),
    el("dt", { text: "type" }), el("dd", { text: run.pipeline_type || "" }),
    run.trace_id ? el("dt", { text: "trace id" }) : null,
    run.trace_id ? el("dd", { text: run.trace_id }) : null);
  if (run.error) {
    facts.append(el("dt", { text: "error" }),
      el("dd", {}, el("pre", { class: "error", "data-testid": "details-error", text: run.error })));
  }
  if (run.result !== undefined) {
    facts.append(el("dt", { text: "result" }),
      el("dd", {}, el("pre", { "data-testid": "details-result", text: preview(run.result, 2000) })));
  }
  return el("tr", { class: "details-row", "data-testid": "run-details" },
    el("td", { colspan: "8" }, steps, facts));
}

function stepRow(run, step, start, span) {
  const row = el("tr", { class: "step", "data-testid": "step", "data-step-index": step.index,
      "data-status": step.status },
    el("td", { class: "num", text: step.index + 1 }),
    el("td", { "data-testid": "step-name", text: step.name }),
    el("td", {}, badge(step.status, "step-status")),
    el("td", { class: "num", "data-testid": "step-attempt", text: step.attempt || "" }),
    el("td", { class: "num", "data-testid": "step-duration", text: formatMs(stepDuration(run, step)) }),
    el("td", {}, step.total === null || step.total === undefined ? "" : progressBar(step)),
    el("td", { class: "timeline" }, timelineBar(run, step, start, span)));
  if (step.error) {
    row.title = step.error;
    row.children[1].append(el("div", { class: "step-error", text: step.error }));
  }
  return row;
}

function progressBar(step) {
  const total = step.total || 0;
  const done = Math.min(step.done || 0, total);
  const pct = total ? (100 * done) / total : 100;
  const fill = el("span", { class: "fill" });
  fill.style.width = `${pct}%`;
  return el("div", { class: "progress", "data-testid": "step-progress", role: "progressbar",
      "aria-valuemin": "0", "aria-valuemax": total, "aria-valuenow": done,
      "data-done": done, "data-total": total },
    el("span", { class: "bar" }, fill), el("span", { class: "label", text: `${done}/${total}` }));
}

function timelineBar(run, step, start, span) {
  const track = el("div", { class: "track" });
  if (!step.started_at || !start) return track;
  const end = step.finished_at || runClock(run);
  const bar = el("span", { class: `tbar s-${step.status}`, "data-testid": "timeline-bar",
    title: `${step.name}: +${formatMs(step.started_at - start)}, ${formatMs(end - step.started_at)}` });
  bar.style.left = `${clampPct((step.started_at - start) / span)}%`;
  bar.style.width = `${clampPct((end - step.started_at) / span)}%`;
  track.append(bar);
  return track;
}

function badge(status, testid) {
  return el("span", { class: `badge s-${status}`, "data-testid": testid, text: status.toLowerCase() });
}

function traceLink(run) {
  if (!run.trace_id || !traceUrl) return "";
  let href;
  try {
    href = new URL(traceUrl.replace("{trace_id}", encodeURIComponent(run.trace_id)), location.href);
  } catch {
    return "";
  }
  if (href.protocol !== "http:" && href.protocol !== "https:") return "";
  return el("a", { href: href.href, target: "_blank", rel: "noopener noreferrer",
    "data-testid": "trace-link", text: "trace ↗" });
}

function renderSummary() {
  const counts = { RUNNING: 0, COMPLETED: 0, FAILED: 0, LOST: 0 };
  for (const run of runs.values()) counts[run.status] = (counts[run.status] || 0) + 1;
  const parts = [`${runs.size} recent runs`, `${counts.RUNNING} running`,
    `${counts.COMPLETED} completed`, `${counts.FAILED} failed`];
  if (counts.LOST) parts.push(`${counts.LOST} lost`);
  document.getElementById("summary").textContent = parts.join(" · ");
  document.getElementById("empty").hidden = runs.size > 0;
}

const clampPct = (x) => Math.max(0, Math.min(100, 100 * x));
// The clock of a run: it stops when the run ends (a step left running in a LOST run too).
const runClock = (run) => (isTerminal(run) ? run.finished_at : Date.now());
const runDuration = (run) => run.duration_ms ?? (run.started_at ? runClock(run) - run.started_at : null);
const stepDuration = (run, s) =>
  s.duration_ms ?? (s.started_at && s.status === "RUNNING" ? runClock(run) - s.started_at : null);
const isoOf = (t) => (t ? new Date(t).toISOString() : "");
const clockOf = (t) => (t ? new Date(t).toLocaleTimeString([], { hour12: false }) : "");

function formatMs(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "";
  const v = Math.max(0, value);
  if (v < 1000) return `${Math.round(v)} ms`;
  if (v < 60000) return `${(v / 1000).toFixed(1)} s`;
  const s = Math.round(v / 1000);
  return `${Math.floor(s / 60)} m ${String(s % 60).padStart(2, "0")} s`;
}

function preview(value, max = 160) {
  let text;
  try {
    text = typeof value === "string" ? value : JSON.stringify(value);
  } catch {
    text = String(value);
  }
  text = text === undefined ? "" : text;
  return text.length > max ? `${text.slice(0, max)}…` : text;
}

// ---------------------------------------------------------------- connection

function setState(state, detail) {
  const node = document.getElementById("connection");
  node.dataset.state = state;
  node.textContent = state;
  document.getElementById("connection-detail").textContent = detail || "";
}

function apiFetch(path) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  return fetch(new URL(path, location.href), { headers, cache: "no-store" }).then((r) => {
    if (r.status === 401) refused();
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
    return r.json();
  });
}

const fetchRuns = () => apiFetch(`api/pipelines?limit=${MAX_RUNS}`);

function wsUrl() {
  const url = new URL("ws/*", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (conn.lastId) url.searchParams.set("since", conn.lastId);
  if (token && !tokenAsSubprotocol) url.searchParams.set("token", token);
  return url.href;
}

function connect() {
  conn.reconnectTimer = 0;
  if (conn.refused) return;
  let ws;
  try {
    ws = tokenAsSubprotocol ? new WebSocket(wsUrl(), ["bearer", token]) : new WebSocket(wsUrl());
  } catch (err) {
    socketDown(`cannot open a WebSocket: ${err.message}`);
    return;
  }
  conn.ws = ws;
  ws.onmessage = (message) => onMessage(message.data);
  ws.onclose = (e) => {
    if (conn.ws !== ws) return;
    conn.ws = null;
    if (e.code === 1008) {
      refused(); // the token: trying again would only count one more rejection
      return;
    }
    // Keep the reason the live socket closed with while later attempts fail.
    if (!conn.closedWith || e.code !== 1006) {
      conn.closedWith = `closed ${e.code}${e.reason ? ` (${e.reason})` : ""}`;
    }
    socketDown(`socket ${conn.closedWith}`);
  };
}

function onMessage(data) {
  let msg;
  try {
    msg = JSON.parse(data);
  } catch {
    return;
  }
  if (!msg || typeof msg !== "object") return;
  if (EVENT_TYPES.has(msg.type)) {
    if (msg.id) conn.lastId = msg.id;
    if (conn.buffer) conn.buffer.push(msg); else applyEvent(msg);
  } else if (msg.type === "subscribed") {
    wentLive(); // not on open: a gateway that rejects the token accepts, then closes
  } else if (msg.type === "snapshot" && msg.pipeline) {
    mergeState(msg.pipeline);
  } else if (msg.type === "error" && msg.code === "history_truncated") {
    resync(true); // e.g. the gateway restarted: what it no longer knows is gone
  }
}

function wentLive() {
  conn.attempt = 0;
  conn.closedWith = "";
  stopPolling();
  setState("live", "events over /ws/*");
  if (conn.lastId === null) resync(true); // nothing to resume from: take the gateway's list
}

// Fetch every run's state while holding the socket's events, then replay those on top:
// nothing that happened between the fetch and the first live event is missed. With
// `replace`, runs the gateway does not list are dropped: the list becomes the gateway's.
async function resync(replace = false) {
  if (conn.buffer) return;
  conn.buffer = [];
  try {
    const list = await fetchRuns();
    if (replace) {
      const listed = new Set(list.map((state) => state.pipeline_id));
      for (const id of [...runs.keys()]) if (!listed.has(id)) drop(id);
      scheduleRender();
    }
    list.forEach(mergeState);
  } catch {
    // the socket's events still arrive; the next poll or resync catches up
  } finally {
    const held = conn.buffer;
    conn.buffer = null;
    held.forEach(applyEvent);
  }
}

function socketDown(detail) {
  if (conn.refused) return;
  const wait = RECONNECT_MS[Math.min(conn.attempt, RECONNECT_MS.length - 1)];
  conn.attempt += 1;
  const state = document.getElementById("connection").dataset.state;
  if (state !== "polling" && state !== "offline") {
    setState("reconnecting", `${detail}; reconnecting…`);
  }
  conn.downDetail = detail;
  startPolling();
  if (!conn.reconnectTimer) conn.reconnectTimer = setTimeout(connect, wait);
}

function startPolling() {
  if (conn.pollTimer || conn.refused) return;
  conn.pollTimer = setInterval(poll, POLL_MS);
  poll();
}

function stopPolling() {
  clearInterval(conn.pollTimer);
  conn.pollTimer = 0;
}

async function poll() {
  try {
    const list = await fetchRuns();
    if (!conn.pollTimer) return; // the socket came back meanwhile: its events are newer
    list.forEach(mergeState);
    setState("polling", `${conn.downDetail}; polling api/pipelines every ${POLL_MS / 1000} s, reconnecting…`);
  } catch (err) {
    if (conn.pollTimer) setState("offline", `${conn.downDetail}; ${err.message}`);
  }
}

// The gateway refused the token (HTTP 401, close 1008): say so, and stop asking.
function refused() {
  conn.refused = true;
  stopPolling();
  clearTimeout(conn.reconnectTimer);
  conn.reconnectTimer = 0;
  const hint = `${token ? "this gateway refused the token" : "this gateway needs a token"}: `
    + `open ${location.pathname}?token=… (the token URL-encoded)`;
  setState("unauthorized", hint);
  document.getElementById("empty").textContent = hint;
}

async function start() {
  setState("connecting", "loading recent runs");
  const [config, list] = await Promise.allSettled([apiFetch("api/config"), fetchRuns()]);
  if (config.status === "fulfilled" && typeof config.value.trace_url === "string") {
    traceUrl = config.value.trace_url;
  }
  if (list.status === "fulfilled") list.value.forEach(mergeState);
  render();
  document.getElementById("runs").addEventListener("click", onRunsClick);
  addEventListener("pointerdown", () => { pressed = true; }, true);
  for (const type of ["pointerup", "pointercancel"]) {
    addEventListener(type, () => { pressed = false; scheduleRender(); }, true);
  }
  connect();
  // Durations and timelines of running runs move with the clock.
  setInterval(() => {
    for (const run of runs.values()) if (!isTerminal(run)) touch(run.pipeline_id);
  }, 1000);
}

start();
