// edgefleet dashboard: one page, no dependencies, reads /api/v1 with the operator's token.
// Every value from the API reaches the page as text (textContent), never as HTML.
// The current view is refreshed every POLL_MS; buttons are shown to operators only
// (the API refuses viewers anyway).
"use strict";

const API = "/api/v1";
const POLL_MS = 2000;
const TOKEN_KEY = "edgefleet-token";
let me = null;
let view = null;
let timer = null;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${token()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(API + path, { method, headers,
                                      body: body === undefined ? undefined : JSON.stringify(body) });
  const data = (r.headers.get("content-type") || "").includes("json") ? await r.json() : null;
  if (r.status === 401) { signOut("The controller refused the token; sign in again."); }
  if (!r.ok) throw new Error(data && data.detail ? `${data.code}: ${data.detail}` : `HTTP ${r.status}`);
  return data;
}

function ago(iso) {
  if (!iso) return "-";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  return s < 120 ? `${Math.max(0, Math.round(s))}s ago` : `${Math.round(s / 60)}m ago`;
}

function modelOf(d) {
  const r = d.reported;
  if (!r) return "-";
  return `${r.model ? `${r.model}@${r.version}` : "none"} ${r.state}`;
}

function table(headers, rows, attrs) {
  return h("table", attrs, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
           h("tbody", {}, rows));
}

function bar(part, whole) {
  const pct = whole ? Math.round((100 * part) / whole) : 0;
  return h("span", { class: "bar", title: `${part}/${whole}` },
           h("span", { style: `width:${pct}%` }));
}

// -- views ---------------------------------------------------------------------------

function fleetView() {
  const el = h("div", { id: "fleet" });
  async function refresh() {
    const [summary, rollouts] = await Promise.all([api("GET", "/fleet/summary"),
                                                   api("GET", "/rollouts?limit=10")]);
    const details = await Promise.all(rollouts.map((r) =>
      r.active ? api("GET", `/rollouts/${r.id}`) : r));
    const models = Object.keys(summary.by_model);
    el.replaceChildren(
      h("div", { class: "cards" },
        h("div", { class: "card", id: "card-devices" }, h("div", { class: "n" }, summary.devices), "devices"),
        ...Object.entries(summary.by_status).map(([s, n]) =>
          h("div", { class: "card", id: `card-${s}` }, h("div", { class: `n ${s}` }, n), s))),
      h("h2", {}, "Rollouts"),
      ...(details.length ? details.map(rolloutBox) : [h("p", { class: "muted" }, "No rollouts yet.")]),
      h("div", { class: "grid" },
        h("div", {}, h("h2", {}, "Devices by model version"),
          table(["model", "devices"], Object.entries(summary.by_model).map(([m, n]) =>
            h("tr", {}, h("td", {}, m), h("td", { class: "num" }, n))), { id: "by-model" })),
        h("div", {}, h("h2", {}, "Devices by class"),
          table(["class", ...models], Object.entries(summary.by_class_model).map(([c, row]) =>
            h("tr", { "data-class": c }, h("td", {}, c),
              models.map((m) => h("td", { class: "num" }, row[m] || 0)))), { id: "by-class" }))));
  }
  return { el, refresh };
}

function rolloutBox(r) {
  const stage = r.stages[r.stage] || {};
  const done = r.counts.committed || 0;
  const box = h("div", { class: "rollout", "data-rollout": r.id, "data-state": r.state },
    h("div", { class: "title" },
      h("a", { href: `#/rollouts/${r.id}` }, h("strong", {}, `${r.model}@${r.version}`)),
      h("span", { class: `state ${r.state}` }, r.state),
      h("span", {}, `stage ${r.stage + 1} of ${r.stages.length} (${stage.label || "-"})`),
      bar(done, r.counts.members || 0), h("span", { class: "muted" }, `${done}/${r.counts.members || 0} committed`),
      actions(r)),
    r.reason ? h("div", { class: "muted" }, r.reason) : null);
  if (Object.keys(r.by_class || {}).length) {
    box.append(table(["class", "devices", "assigned", "committed", "failed", "gate", "error rate +", "p95 ratio"],
      Object.entries(r.by_class).map(([c, x]) => {
        const f = x.figures || {};
        const cmp = f.comparison || {};
        return h("tr", {}, h("td", {}, c), h("td", { class: "num" }, x.devices),
          h("td", { class: "num" }, x.assigned), h("td", { class: "num" }, x.committed),
          h("td", { class: "num" }, x.failed), h("td", { class: f.verdict || "" }, f.verdict || "-"),
          h("td", { class: "num" }, fmt(cmp.error_rate_increase)),
          h("td", { class: "num" }, fmt(cmp.latency_p95_ratio)));
      }), { class: "gates" }));
  }
  if ((r.timeline || []).length) {
    box.append(h("ol", { class: "timeline" },
      r.timeline.slice(-5).map((e) => h("li", {}, `${e.at.slice(11, 19)} ${e.reason}`))));
  }
  return box;
}

function fmt(x) { return typeof x === "number" ? x.toFixed(3) : "-"; }

function actions(r) {
  if (!me || me.role === "viewer" || !r.active) return null;
  const button = (verb, label, cls) => h("button", {
    class: cls, "data-action": verb,
    onclick: async () => {
      if (!window.confirm(`${label} ${r.model}@${r.version}?`)) return;
      try { await api("POST", `/rollouts/${r.id}/${verb}`, { reason: "from the dashboard" }); }
      catch (err) { setStatus(err.message, true); }
      tick();
    } }, label);
  return h("span", { class: "actions" },
    r.state === "paused" ? button("resume", "Resume") : button("pause", "Pause"),
    r.state === "rolling_back" ? null : button("rollback", "Roll back", "danger"),
    button("abort", "Abort"));
}

function devicesView() {
  const search = h("input", { type: "search", placeholder: "search id, name, class, model", id: "search" });
  const status = h("select", { id: "status-filter" },
    ["", "online", "offline", "enrolled"].map((s) => h("option", { value: s }, s || "any status")));
  const body = h("div");
  search.addEventListener("input", () => tick());
  status.addEventListener("change", () => tick());
  const el = h("div", {}, h("div", { class: "filters" }, search, status), body);
  async function refresh() {
    const q = status.value ? `?status=${status.value}` : "";
    const needle = search.value.trim().toLowerCase();
    const devices = (await api("GET", `/devices${q}`)).filter((d) => !needle ||
      [d.id, d.name, d.device_class, modelOf(d)].join(" ").toLowerCase().includes(needle));
    body.replaceChildren(table(["device", "name", "status", "class", "model", "CPU %", "seen"],
      devices.map((d) => h("tr", { "data-device": d.id },
        h("td", {}, h("a", { href: `#/devices/${d.id}` }, d.id)), h("td", {}, d.name),
        h("td", { class: `status ${d.status}` }, d.status), h("td", {}, d.device_class),
        h("td", {}, modelOf(d)), h("td", { class: "num" }, (d.last_health || {}).cpu_percent ?? "-"),
        h("td", {}, ago(d.last_seen_at)))), { id: "devices" }));
  }
  return { el, refresh };
}

function fidelityText(c) {
  if (!c || !c.fidelity) return "-";
  const f = c.fidelity[c.metric];
  return f === undefined ? "-" : `${c.metric} ${f.toFixed(4)}`;
}

function modelsView() {
  const el = h("div", { id: "models" });
  async function refresh() {
    const versions = await api("GET", "/models");
    el.replaceChildren(...(versions.length ? versions.map((v) => {
      const rows = v.variants.map((x) => {
        const c = x.comparison || {};
        const ms = c.latency_ms;
        return h("tr", { "data-variant": x.name },
          h("td", {}, x.name), h("td", {}, `${x.format} ${x.quantization}`),
          h("td", { class: "num" }, x.size.toLocaleString()),
          h("td", {}, c.size_ratio !== undefined ? `${Math.round(100 * c.size_ratio)}%` : "-"),
          h("td", {}, fidelityText(c)),
          h("td", {}, ms ? `${ms.variant} ms (source ${ms.source})` : "-"),
          h("td", { class: "num" }, `${Math.round(x.ram_estimate_bytes / 1048576)} MiB${x.ram_measured ? "" : " (estimate)"}`),
          h("td", { class: c.warning ? "warning" : "" }, x.signed ? (c.warning ? `offered: ${c.warning}` : "offered") : "not signed"));
      });
      const refused = (v.refused || []).map((r) => h("tr", { "data-refused": r.name, class: "refused" },
        h("td", {}, r.name), h("td", { colspan: 4 }, fidelityText(r.comparison)),
        h("td", { colspan: 3, class: "reason" }, `refused: ${r.reason}`)));
      const job = v.job || {};
      return h("section", { class: "version", "data-version": `${v.name}@${v.version}` },
        h("h2", {}, `${v.name}@${v.version} `, h("span", { class: `state ${v.status}` }, v.status)),
        v.status === "processing" || v.status === "failed"
          ? h("p", { class: "muted" }, `${Math.round(100 * (job.progress || 0))}% ${job.message || ""}`) : null,
        table(["variant", "kind", "bytes", "size", "fidelity", "latency", "RAM", ""],
              [...rows, ...refused]));
    }) : [h("p", { class: "muted" }, "No models yet.")]));
  }
  return { el, refresh };
}

function chart(title, points, unit) {
  const w = 420, hgt = 120, pad = 24;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", w);
  svg.setAttribute("height", hgt);
  const label = document.createElementNS(svg.namespaceURI, "text");
  label.setAttribute("x", 6);
  label.setAttribute("y", 14);
  const values = points.map((p) => p[1]).filter((v) => typeof v === "number");
  const max = Math.max(1e-9, ...values);
  label.textContent = values.length
    ? `${title}: ${values[values.length - 1].toFixed(1)} ${unit} (max ${max.toFixed(1)})` : `${title}: no data`;
  svg.append(label);
  if (points.length > 1) {
    const t0 = points[0][0], t1 = points[points.length - 1][0];
    const line = document.createElementNS(svg.namespaceURI, "polyline");
    line.setAttribute("points", points.filter((p) => typeof p[1] === "number").map((p) =>
      `${pad + ((p[0] - t0) / Math.max(1e-9, t1 - t0)) * (w - 2 * pad)},${hgt - pad / 2 - (p[1] / max) * (hgt - 2 * pad)}`).join(" "));
    svg.append(line);
  }
  return svg;
}

function deviceView(id) {
  const el = h("div", { id: "device" });
  async function refresh() {
    const [d, health, events] = await Promise.all([api("GET", `/devices/${id}`),
      api("GET", `/devices/${id}/health?minutes=10`), api("GET", `/devices/${id}/events?limit=50`)]);
    const caps = d.capabilities || {};
    el.replaceChildren(
      h("h2", {}, `${d.name} (${d.id})`),
      h("p", {}, h("span", { class: `status ${d.status}` }, d.status), ` since ${ago(d.status_since)} · `,
        `class ${d.device_class} · agent ${d.agent_version || "-"} · runs ${modelOf(d)} · `,
        `${caps.cpu_count || "?"} CPUs, ${((caps.ram_bytes || 0) / 2 ** 30).toFixed(1)} GiB`),
      h("div", { class: "grid" },
        chart("CPU", health.map((x) => [x.t, x.cpu_percent]), "%"),
        chart("memory", health.map((x) => [x.t, (100 * x.mem_used_bytes) / Math.max(1, x.mem_total_bytes)]), "%"),
        chart("latency p95", health.map((x) => [x.t, x.latency_p95_ms]), "ms"),
        chart("inference errors", health.map((x) => [x.t, x.error_count]), "")),
      h("h2", {}, "Install history"),
      table(["at", "event", "generation", "detail"], events.slice().reverse().map((e) =>
        h("tr", {}, h("td", {}, e.at.replace("T", " ").slice(0, 19)), h("td", { class: e.kind }, e.kind),
          h("td", { class: "num" }, e.generation), h("td", {}, e.detail))), { id: "events" }));
  }
  return { el, refresh };
}

function rolloutView(id) {
  const el = h("div");
  async function refresh() {
    const r = await api("GET", `/rollouts/${id}`);
    el.replaceChildren(rolloutBox({ ...r, timeline: [] }),
      h("h2", {}, "Stages"),
      table(["stage", "devices", "assigned", "committed", "failed", "bake"], r.stages.map((s, i) =>
        h("tr", {}, h("td", {}, `${i + 1}: ${s.label}`), h("td", { class: "num" }, s.devices),
          h("td", { class: "num" }, s.assigned), h("td", { class: "num" }, s.committed),
          h("td", { class: "num" }, s.failed), h("td", { class: "num" }, `${s.bake_s}s`)))),
      h("h2", {}, "Timeline"),
      table(["at", "kind", "state", "by", "reason"], r.timeline.map((e) =>
        h("tr", {}, h("td", {}, e.at.replace("T", " ").slice(0, 19)), h("td", {}, e.kind),
          h("td", { class: e.state }, e.state), h("td", {}, e.actor), h("td", {}, e.reason)))));
  }
  return { el, refresh };
}

// -- shell ---------------------------------------------------------------------------

function setStatus(text, bad) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = bad ? "error" : "";
}

let busy = false;

async function tick() {
  if (!view || busy) return;
  busy = true;
  try {
    await view.refresh();
    setStatus(`updated ${new Date().toLocaleTimeString()} · refreshes every ${POLL_MS / 1000}s`);
  } catch (err) {
    setStatus(`could not refresh: ${err.message}`, true);
  } finally {
    busy = false;
  }
}

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [page, id] = hash.split("/").map(decodeURIComponent);
  view = page === "devices" && id ? deviceView(id) : page === "devices" ? devicesView()
    : page === "rollouts" && id ? rolloutView(id) : page === "models" ? modelsView() : fleetView();
  document.getElementById("app").replaceChildren(view.el);
  tick();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  me = null;
  clearInterval(timer);
  view = null;
  showLogin(message);
}

function showLogin(message) {
  document.getElementById("who").textContent = "";
  document.getElementById("signout").hidden = true;
  const input = h("input", { type: "password", id: "token", placeholder: "API token (edgefleet token create)",
                             autocomplete: "off" });
  const form = h("form", { class: "login", id: "login" },
    h("h2", {}, "Sign in"),
    h("p", { class: "muted" }, "Paste an API token. A viewer token shows the fleet; an operator token can also pause, resume and roll back."),
    input, h("button", { type: "submit" }, "Sign in"),
    message ? h("p", { class: "error" }, message) : null);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    start();
  });
  document.getElementById("app").replaceChildren(form);
  setStatus("signed out");
}

async function start() {
  if (!token()) { showLogin(); return; }
  try {
    me = await api("GET", "/whoami");
  } catch (err) {
    if (token()) showLogin(err.message);
    return;
  }
  document.getElementById("who").textContent = `${me.name} (${me.role})`;
  document.getElementById("signout").hidden = false;
  route();
  clearInterval(timer);
  timer = setInterval(tick, POLL_MS);
}

window.addEventListener("hashchange", () => { if (me) route(); });
document.getElementById("signout").addEventListener("click", () => signOut());
start();
