// agentledger dashboard: renders the snapshots the server pushes over SSE. No dependencies.
// Data is only ever put into the page with textContent / attributes, never as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
// lags: how old each snapshot was (ms since the collector took it) when the page drew it.
const state = { snapshot: null, events: 0, rows: new Map(), order: "", lags: [] };
window.__agentledger = state; // for tests and for poking at it from the console

function $(id) { return document.getElementById(id); }

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// Money arrives as exact decimal strings; rounding here is for display only.
function usd(s) {
  if (s === null || s === undefined) return "-";
  const n = Number(s);
  return "$" + (Math.abs(n) >= 100 ? n.toFixed(2) : n.toFixed(4));
}

function pct(hundredths) {
  if (hundredths === null || hundredths === undefined) return "-";
  return (hundredths / 100).toFixed(2) + "%";
}

function utc(ms) {
  if (ms === null || ms === undefined) return "-";
  return new Date(ms).toISOString().slice(11, 19) + "Z";
}

function utcDay(ms) {
  if (ms === null || ms === undefined) return "-";
  return new Date(ms).toISOString().slice(5, 16).replace("T", " ") + "Z";
}

// -- the budget bars ------------------------------------------------------------------------

function budgetBar(row) {
  const p = row.periods.find((x) => x.period === row.headline) || row.periods[0];
  const used = p.pct_hundredths === null ? null : p.pct_hundredths / 100;
  const scale = Math.min(200, Math.max(120, used || 0)); // the bar shows 0..scale percent
  const svg = svgEl("svg", { viewBox: "0 0 100 26", preserveAspectRatio: "none" });
  svg.appendChild(svgEl("rect", { x: 0, y: 6, width: 100, height: 14, fill: "#0b0f13" }));
  if (used === null) {
    // No budget governs this scope: show the spend with no scale.
    svg.appendChild(svgEl("rect", { x: 0, y: 6, width: 2, height: 14, fill: "#8a96a3" }));
    return svg;
  }
  const warnAt = p.thresholds
    .filter((t) => t.action !== "stop")
    .map((t) => Number(t.at_percent))
    .sort((a, b) => a - b);
  let color = "#2f81f7";
  if (used >= 100) color = "#f85149";
  else if (warnAt.length && used >= warnAt[0]) color = "#d29922";
  const w = (Math.min(used, scale) / scale) * 100;
  svg.appendChild(svgEl("rect", { x: 0, y: 6, width: w, height: 14, fill: color, class: "fill" }));
  for (const at of warnAt) {
    const x = (Math.min(at, scale) / scale) * 100;
    svg.appendChild(svgEl("line", {
      x1: x, x2: x, y1: 2, y2: 24, stroke: "#d29922", "stroke-width": 0.8, class: "warn-mark",
    }));
  }
  const limitX = (100 / scale) * 100;
  svg.appendChild(svgEl("line", {
    x1: limitX, x2: limitX, y1: 0, y2: 26, stroke: "#f85149", "stroke-width": 1.2,
    class: "limit-mark",
  }));
  return svg;
}

// -- the scopes table -------------------------------------------------------------------------

async function sendCommand(scope, action, concurrency) {
  const body = { scope, action, operator: $("operator").value || "dashboard" };
  const reason = $("reason").value.trim();
  if (reason) body.reason = reason;
  if (action === "throttle") body.concurrency = concurrency;
  const out = $("action-result");
  out.textContent = `sending ${action} for ${scope}...`;
  try {
    const response = await fetch("/api/control", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      credentials: "same-origin",
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
    out.textContent = `${answer.action.toUpperCase()} for ${answer.scope} published by ${answer.issuer} at ${utc(answer.issued_at_ms)}`;
    out.className = "";
  } catch (err) {
    out.textContent = `could not send ${action} for ${scope}: ${err.message}`;
    out.className = "error";
  }
}

function makeRow(scope) {
  const tr = el("tr", { "data-scope": scope });
  const cells = {
    scope: el("td", { class: "scope" }, scope),
    bar: el("td", { class: "bar" }),
    used: el("td", { class: "num used" }),
    rate: el("td", { class: "num rate" }),
    forecast: el("td", { class: "num forecast" }),
    standing: el("td", { class: "standing" }),
    ops: el("td", { class: "ops" }),
  };
  const stop = el("button", { class: "stop", "data-action": "stop", type: "button" }, "Stop");
  const n = el("input", { class: "n", type: "number", min: "1", value: "1", "aria-label": "concurrency" });
  const throttle = el("button", { "data-action": "throttle", type: "button" }, "Throttle");
  const resume = el("button", { "data-action": "resume", type: "button" }, "Resume");
  stop.addEventListener("click", () => sendCommand(scope, "stop"));
  throttle.addEventListener("click", () => sendCommand(scope, "throttle", Number(n.value)));
  resume.addEventListener("click", () => sendCommand(scope, "resume"));
  cells.ops.append(stop, " ", n, throttle, " ", resume);
  for (const c of Object.values(cells)) tr.appendChild(c);
  return { tr, cells };
}

function standingBadge(cmd) {
  if (!cmd) return null;
  const span = el("span", {}, "");
  const params = Object.entries(cmd.params || {}).map(([k, v]) => `${k}=${v}`).join(" ");
  span.appendChild(el("span", { class: `badge ${cmd.action}` }, cmd.action.toUpperCase() + (params ? " " + params : "")));
  span.appendChild(el("span", { class: "muted" }, ` ${cmd.issuer}: ${cmd.reason}`));
  return span;
}

function updateRow(entry, row) {
  const { cells } = entry;
  cells.bar.replaceChildren(budgetBar(row));
  const label = el("div", { class: "barlabel" },
    `${usd(row.spend_usd)} of ${row.limit_usd === null ? "no limit" : usd(row.limit_usd)} (${row.headline})`);
  label.title = `exact: ${row.spend_usd} USD`;
  cells.bar.appendChild(label);
  cells.used.textContent = pct(row.pct_hundredths);
  cells.used.className = "num used" + (row.pct_hundredths >= 10000 ? " over" : row.pct_hundredths >= 8000 ? " near" : "");
  cells.rate.textContent = usd(row.rate_usd_per_hour);
  cells.rate.title = row.rate_source === "recent" ? "over the last minutes" : "average since the period began";
  let f = usd(row.forecast_usd);
  if (row.forecast_pct_hundredths !== null) f += ` (${pct(row.forecast_pct_hundredths)})`;
  if (row.exhausts_at_ms !== null && row.pct_hundredths < 10000) f += ` limit at ${utcDay(row.exhausts_at_ms)}`;
  cells.forecast.textContent = f;
  cells.forecast.className = "num forecast" + (row.forecast_pct_hundredths >= 10000 ? " over" : "");
  const badge = standingBadge(row.standing);
  const parts = badge ? [badge] : [];
  if (row.paused_calls) parts.push(el("span", { class: "badge paused" }, `PAUSED ${row.paused_calls}`));
  cells.standing.replaceChildren(...parts);
}

const SORT_FIELDS = {
  spend: "spend_nano", pct: "pct_hundredths", rate: "rate_nano_per_hour", forecast: "forecast_nano",
};

function sortRows(rows, key) {
  const byName = [...rows].sort((a, b) => (a.scope < b.scope ? -1 : a.scope > b.scope ? 1 : 0));
  if (key === "scope") return byName;
  const f = SORT_FIELDS[key];
  const v = (r) => (r[f] === null ? -1 : r[f]);
  return byName.sort((a, b) => v(b) - v(a));
}

function renderScopes(snap) {
  const body = $("scopes").tBodies[0];
  const rows = sortRows(snap.scopes, $("sort").value);
  const live = new Set(rows.map((r) => r.scope));
  for (const [scope, entry] of state.rows) {
    if (!live.has(scope)) { entry.tr.remove(); state.rows.delete(scope); }
  }
  for (const row of rows) {
    let entry = state.rows.get(row.scope);
    if (!entry) { entry = makeRow(row.scope); state.rows.set(row.scope, entry); }
    updateRow(entry, row);
  }
  // Move rows only when the order changed, so a click in progress is never disturbed.
  const order = rows.map((r) => r.scope).join("\n");
  if (order !== state.order) {
    for (const row of rows) body.appendChild(state.rows.get(row.scope).tr);
    state.order = order;
  }
  $("no-scopes").hidden = rows.length > 0;
}

// -- lists ---------------------------------------------------------------------------------

function renderList(id, items, render) {
  const list = $(id);
  list.replaceChildren(...items.map(render));
  if (!items.length) list.appendChild(el("li", { class: "muted" }, "none"));
}

function renderStanding(snap) {
  renderList("standing", snap.standing, (c) => {
    const li = el("li", { "data-scope": c.scope });
    li.appendChild(el("span", { class: "when" }, utcDay(c.issued_at_ms)));
    li.appendChild(el("span", { class: `badge ${c.action}` }, c.action.toUpperCase()));
    li.appendChild(document.createTextNode(` ${c.scope}: ${c.reason} `));
    li.appendChild(el("span", { class: "muted" }, `(${c.issuer}${c.until_ms ? ", until " + utcDay(c.until_ms) : ""})`));
    return li;
  });
}

function renderPaused(snap) {
  renderList("paused", snap.paused, (p) => {
    const li = el("li", { "data-scope": p.scope, "data-process": p.process });
    li.appendChild(el("span", { class: "when" }, `since ${utcDay(p.since_ms)}`));
    li.appendChild(el("span", { class: "badge paused" }, `PAUSED ${p.calls}`));
    li.appendChild(document.createTextNode(` ${p.scope} (${p.agents.join(", ")}): ${p.reason} `));
    const until = p.resets_at_ms ? `resets ${utcDay(p.resets_at_ms)}, ` : "";
    li.appendChild(el("span", { class: "muted" },
      `(${until}gives up ${utcDay(p.waits_until_ms)}; ${p.host} pid ${p.pid}) `));
    const resume = el("button", { "data-action": "resume", type: "button" }, "Resume");
    resume.addEventListener("click", () => sendCommand(p.scope, "resume"));
    li.appendChild(resume);
    return li;
  });
}

function renderAlerts(snap) {
  renderList("alerts", snap.alerts.slice(0, 30), (a) => {
    const li = el("li", { class: `sev-${a.severity}` });
    li.appendChild(el("span", { class: "when" }, utcDay(a.issued_at_ms)));
    li.appendChild(document.createTextNode(`[${a.kind}] ${a.scope}: ${a.message}`));
    return li;
  });
}

function renderAudit(snap) {
  renderList("audit", snap.operator_audit, (c) => {
    const li = el("li");
    li.appendChild(el("span", { class: "when" }, utcDay(c.issued_at_ms)));
    const params = Object.entries(c.params || {}).map(([k, v]) => `${k}=${v}`).join(" ");
    li.appendChild(document.createTextNode(
      `${c.issuer} ${c.action.toUpperCase()}${params ? " " + params : ""} ${c.scope}: ${c.reason}${c.verified ? "" : " (UNVERIFIED signature)"}`));
    return li;
  });
}

// -- charts (hand-written SVG) ---------------------------------------------------------------

function renderSeries(snap) {
  const svg = $("series");
  svg.replaceChildren();
  const W = 600, H = 180, left = 48, bottom = 18;
  const end = Math.floor(snap.now_ms / 60000) * 60000;
  const start = end - 59 * 60000;
  const byMinute = new Map(snap.series.map((p) => [p.t, Number(p.usd)]));
  const max = Math.max(0, ...byMinute.values());
  const top = max > 0 ? max * 1.1 : 1;
  for (const frac of [0, 0.5, 1]) {
    const y = H - bottom - frac * (H - bottom - 8);
    svg.appendChild(svgEl("line", { x1: left, x2: W, y1: y, y2: y, stroke: "#2a3440" }));
    svg.appendChild(svgEl("text", { x: 2, y: y + 4 }, usd(String(top * frac))));
  }
  const bw = (W - left) / 60;
  for (let i = 0; i < 60; i++) {
    const t = start + i * 60000;
    const v = byMinute.get(t) || 0;
    if (!v) continue;
    const h = (v / top) * (H - bottom - 8);
    const bar = svgEl("rect", { x: left + i * bw + 1, y: H - bottom - h, width: bw - 2, height: h, fill: "#2f81f7" });
    bar.appendChild(svgEl("title", {}, `${utc(t)}: ${usd(String(v))}`));
    svg.appendChild(bar);
  }
  svg.appendChild(svgEl("text", { x: left, y: H - 4 }, utc(start)));
  svg.appendChild(svgEl("text", { x: W - 60, y: H - 4 }, utc(end)));
  if (!snap.series.length) svg.appendChild(svgEl("text", { x: W / 2 - 40, y: H / 2 }, "no history yet"));
}

function renderTop(snap) {
  const svg = $("top");
  svg.replaceChildren();
  const agents = snap.top_agents;
  const W = 600, rowH = 18, labelW = 170;
  svg.setAttribute("viewBox", `0 0 ${W} ${Math.max(1, agents.length) * rowH + 4}`);
  const max = Math.max(0, ...agents.map((a) => Number(a.spend_usd)));
  agents.forEach((a, i) => {
    const y = i * rowH + 2;
    const w = max > 0 ? (Number(a.spend_usd) / max) * (W - labelW - 110) : 0;
    svg.appendChild(svgEl("text", { x: 0, y: y + 12 }, a.agent_id.slice(0, 26)));
    svg.appendChild(svgEl("rect", { x: labelW, y, width: Math.max(1, w), height: rowH - 4, fill: "#2f81f7" }));
    svg.appendChild(svgEl("text", { x: labelW + w + 6, y: y + 12 }, `${usd(a.spend_usd)} · ${a.calls} calls`));
  });
  if (!agents.length) svg.appendChild(svgEl("text", { x: 10, y: 14 }, "no calls today yet"));
}

// -- the live connection -------------------------------------------------------------------

function render(snap) {
  state.snapshot = snap;
  state.events += 1;
  state.lags.push(Date.now() - snap.now_ms);
  if (state.lags.length > 200) state.lags.shift();
  $("updated").textContent = `updated ${utc(snap.now_ms)} · ${state.events} updates`;
  const problems = Object.entries(snap.health).filter(([, v]) => v).map(([k, v]) => `${k}: ${v}`);
  $("health").textContent = problems.join(" | ");
  renderScopes(snap);
  renderStanding(snap);
  renderPaused(snap);
  renderAlerts(snap);
  renderAudit(snap);
  renderSeries(snap);
  renderTop(snap);
}

function showLogin() {
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-failed").hidden = !location.search.includes("login=failed");
  $("conn").textContent = "logged out";
}

function connect() {
  const source = new EventSource("/api/events");
  source.addEventListener("open", () => {
    $("conn").textContent = "live";
    $("conn").className = "conn live";
  });
  source.addEventListener("snapshot", (event) => render(JSON.parse(event.data)));
  source.addEventListener("error", async () => {
    $("conn").textContent = "reconnecting";
    $("conn").className = "conn down";
    const probe = await fetch("/api/snapshot", { credentials: "same-origin" }).catch(() => null);
    if (probe && probe.status === 401) { source.close(); showLogin(); }
  });
}

async function start() {
  $("sort").addEventListener("change", () => { state.order = ""; if (state.snapshot) renderScopes(state.snapshot); });
  const response = await fetch("/api/snapshot", { credentials: "same-origin" }).catch(() => null);
  if (response && response.status === 401) { showLogin(); return; }
  $("app").hidden = false;
  if (response && response.ok) render(await response.json());
  connect();
}

start();
