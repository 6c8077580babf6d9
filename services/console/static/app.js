// cmr console: plain ES module, no build step. Data from /v1/console/* (any valid key) and the
// public API (/v1/models, /v1/admin/*); the key lives in sessionStorage (this tab only).
import uPlot from "./vendor/uplot/uPlot.esm.js";

const $ = (sel) => document.querySelector(sel);
const KEY = "cmr-console-key";
const POLL_MS = 2000;
const MAX_ROWS = 200;
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const charts = {};
window.cmrCharts = charts; // read by the browser tests
let me = null;
let view = "decisions";
let timer = null;

class APIError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, opts = {}) {
  const key = sessionStorage.getItem(KEY) || "";
  const headers = { ...(opts.body ? { "content-type": "application/json" } : {}), ...(key ? { authorization: `Bearer ${key}` } : {}) };
  const res = await fetch(path, { ...opts, headers });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = new APIError(res.status, body?.error?.message || res.statusText);
    if (res.status === 401) logout(err.message);
    throw err;
  }
  return body;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text); // text only: nothing from the server is parsed as HTML
  if (cls) e.className = cls;
  return e;
}

// d significant digits, trailing zeros dropped (0, 1000, 0.125, 1.23e-7)
const fmt = (x, d = 3) => (x === null || x === undefined ? "–" : String(parseFloat(Number(x).toPrecision(d))));
const when = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "–");
const whenFull = (t) => (t ? new Date(t * 1000).toLocaleString() : "–");

// -- login ------------------------------------------------------------------------------------
async function login(key) {
  sessionStorage.setItem(KEY, key);
  try {
    me = await api("/v1/console/whoami");
  } catch (e) {
    sessionStorage.removeItem(KEY);
    $("#login-error").textContent = `refused: ${e.message}`;
    return;
  }
  $("#login-error").textContent = "";
  document.body.classList.toggle("admin", me.admin);
  $("#who").textContent = me.open ? "open mode (no keys)" : `key ${me.key_id} · tenant ${me.tenant} · ${me.scopes.join(", ")}`;
  $("#login").hidden = true;
  $("#tabs").hidden = false;
  $("#logout").hidden = false;
  show(view);
}

function logout(message = "") {
  sessionStorage.removeItem(KEY);
  me = null;
  clearInterval(timer);
  document.body.classList.remove("admin");
  for (const v of document.querySelectorAll(".view")) v.hidden = true;
  $("#tabs").hidden = true;
  $("#logout").hidden = true;
  $("#who").textContent = "";
  $("#login").hidden = false;
  $("#login-error").textContent = message;
}

function show(name) {
  view = name;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("on", b.dataset.view === name);
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== `view-${name}`;
  clearInterval(timer);
  const loaders = { decisions: pollDecisions, usage: loadUsage, learner: loadLearner, hub: loadHub, whatif: loadWhatif };
  const run = () => document.visibilityState === "visible" && loaders[name]().catch(report);
  run();
  // only the live views poll, and only while shown: nobody watching costs the router nothing
  if (name === "decisions") timer = setInterval(run, POLL_MS);
  if (name === "learner") timer = setInterval(run, 5000);
}

function report(e) {
  const target = { hub: "#register-result", whatif: "#w-summary" }[view];
  if (target) $(target).textContent = `error: ${e.message}`;
  console.error(e);
}

// -- decisions --------------------------------------------------------------------------------
function decisionsQuery() {
  const q = new URLSearchParams({ limit: String(MAX_ROWS) });
  if ($("#f-model").value.trim()) q.set("model", $("#f-model").value.trim());
  if (me.admin && $("#f-tenant").value.trim()) q.set("tenant", $("#f-tenant").value.trim());
  return q;
}

// the newest decisions, re-read whole on each poll: rewards posted since then show up too
async function pollDecisions() {
  if ($("#f-pause").checked) return;
  const { decisions } = await api(`/v1/console/decisions?${decisionsQuery()}`);
  const rows = decisions.map((d) => {
    const tr = el("tr");
    tr.dataset.requestId = d.request_id;
    tr.dataset.fallback = d.superseded_by ? "1" : "";
    if (d.superseded_by) tr.className = "fallback";
    const cells = [when(d.created), d.model, fmt(d.score), fmt(d.cost_weight), d.latency_s == null ? "–" : (1000 * d.latency_s).toFixed(1),
      d.superseded_by ? `failed → ${d.superseded_by}` : "", d.tenant ?? "–", fmt(d.reward)];
    for (const c of cells) tr.append(el("td", c));
    if (me.admin) { const td = el("td", d.query ?? "", "prompt admin-only"); td.title = d.query ?? ""; tr.append(td); }
    return tr;
  });
  $("#decisions tbody").replaceChildren(...rows);
  applyFallbackFilter();
}

function applyFallbackFilter() {
  const only = $("#f-fallback").checked;
  for (const tr of $("#decisions tbody").rows) tr.hidden = only && !tr.dataset.fallback;
}

function resetDecisions() {
  pollDecisions().catch(report);
}

// -- usage ------------------------------------------------------------------------------------
function chart(id, opts, data) {
  charts[id]?.destroy();
  const box = $(`#${id}`);
  box.replaceChildren();
  charts[id] = new uPlot({ width: Math.max(box.clientWidth, 400), height: 260, ...opts }, data, box);
  return charts[id];
}

async function loadUsage() {
  const u = await api(`/v1/console/usage?window_s=${$("#u-window").value}&buckets=30`);
  const names = Object.keys(u.models);
  const series = [{ label: "time" }, ...names.map((m, i) => ({ label: m, stroke: COLORS[i % COLORS.length], width: 2 }))];
  chart("u-share", { series, axes: [{}, { label: "decisions" }] }, [u.times, ...names.map((m) => u.models[m].decisions)]);
  const sum = (k) => u.times.map((_, b) => names.reduce((s, m) => s + u.models[m][k][b], 0));
  const reward = u.times.map((_, b) => {
    const r = names.map((m) => [u.models[m].reward[b], u.models[m].decisions[b]]).filter(([x]) => x !== null);
    const n = r.reduce((s, [, k]) => s + k, 0);
    return n ? r.reduce((s, [x, k]) => s + x * k, 0) / n : null;
  });
  chart("u-cost", {
    series: [{ label: "time" }, { label: "cost", stroke: COLORS[3], width: 2, scale: "cost" }, { label: "mean reward", stroke: COLORS[2], width: 2, scale: "reward", spanGaps: true }],
    scales: { reward: { range: [0, 1] } },
    axes: [{}, { scale: "cost", label: "cost" }, { scale: "reward", side: 1, label: "reward", grid: { show: false } }],
  }, [u.times, sum("cost"), reward]);
  const body = $("#usage tbody");
  body.replaceChildren();
  for (const m of names) {
    const t = u.models[m].total;
    const tr = el("tr");
    for (const c of [m, t.decisions, `${(100 * t.share).toFixed(1)} %`, fmt(t.cost, 4), t.feedback, fmt(t.reward)]) tr.append(el("td", c));
    body.append(tr);
  }
}

// -- learner ----------------------------------------------------------------------------------
async function loadLearner() {
  const s = await api("/v1/console/status");
  const l = s.learner || {};
  const ck = s.checkpoint || {};
  const facts = [
    ["policy", s.policy], ["models (servable)", `${s.models} (${s.servable})`], ["hub version", s.hub_version],
    ["router checkpoint", `v${ck.version ?? s.checkpoint_version} written ${whenFull(ck.written)}`],
    ["last consolidation", ck.last_consolidation ? `v${ck.last_consolidation.version} at ${whenFull(ck.last_consolidation.written)}` : "none yet"],
    ["feedback stored (offset)", s.feedback_offset],
    ["learner", s.learner ? (l.error || l.state || `instance ${l.instance}, started ${whenFull(l.started)}`) : "disabled"],
    ["learner checkpoint", l.checkpoint_version !== undefined ? `v${l.checkpoint_version}` : "–"],
    ["lag (events waiting)", l.waiting ?? "–"], ["learnt offset", l.offset ?? "–"], ["steps / events learnt", l.steps !== undefined ? `${l.steps} / ${l.events_learnt}` : "–"],
    ["failures", l.failures ?? "–"], ["last error", l.last_error ? `${whenFull(l.last_error.time)}: ${l.last_error.error}` : "none"],
    ["default λ", `${fmt(s.cost_weight, 4)} (${s.calibration ? s.calibration.source : "AppArgs.cost_weight"})`],
  ];
  const dl = $("#learner");
  dl.replaceChildren();
  for (const [k, v] of facts) { dl.append(el("dt", k)); const dd = el("dd", v ?? "–"); dd.dataset.fact = k; dl.append(dd); }
}

// -- hub --------------------------------------------------------------------------------------
let cards = [];
async function loadHub() {
  cards = (await api("/v1/models")).data.filter((m) => m.id !== "auto");
  renderHub();
}

function renderHub() {
  const q = $("#h-search").value.trim().toLowerCase();
  const body = $("#hub tbody");
  const hits = cards.filter((c) => !q || [c.id, c.owned_by, c.domain].some((x) => (x || "").toLowerCase().includes(q)));
  body.replaceChildren();
  $("#h-count").textContent = hits.length > MAX_ROWS ? `${hits.length} cards, the first ${MAX_ROWS} shown: narrow the search` : `${hits.length} cards`;
  for (const c of hits.slice(0, MAX_ROWS)) {
    const tr = el("tr");
    tr.dataset.model = c.id;
    for (const v of [c.id, c.owned_by, c.domain ?? "–", fmt(c.cost, 4), c.servable ? "yes" : "no"]) tr.append(el("td", v));
    tr.addEventListener("click", () => openCard(c.id).catch(report));
    body.append(tr);
  }
}

async function openCard(id) {
  const { card } = await api(`/v1/console/models/${encodeURIComponent(id)}`);
  const box = $("#card");
  box.replaceChildren(el("h2", card.id));
  const facts = el("dl", null, "facts");
  for (const [k, v] of [["family", card.family], ["domain", card.domain], ["cost", card.cost], ["description", card.description],
    ["backend", JSON.stringify(card.backend)], ["profile answers", Object.keys(card.profile || {}).length], ["added", whenFull(card.added_at)]]) {
    facts.append(el("dt", k), el("dd", v ?? "–"));
  }
  box.append(facts);
  if (me.admin) {
    const b = el("button", "Retire", "admin-only");
    b.id = "retire";
    b.addEventListener("click", async () => {
      try {
        await api(`/v1/admin/models/${encodeURIComponent(id)}`, { method: "DELETE" });
        box.replaceChildren(el("p", `${id} retired`));
        await loadHub();
      } catch (e) { report(e); }
    });
    box.append(b);
  }
}

async function register(ev) {
  ev.preventDefault();
  const f = new FormData(ev.target);
  let backend;
  try { backend = JSON.parse(f.get("backend") || "{}"); } catch { $("#register-result").textContent = "error: backend is not JSON"; return; }
  const card = { id: f.get("id").trim(), cost: Number(f.get("cost") || 0), backend, description: f.get("description") || "" };
  for (const k of ["family", "domain"]) if (f.get(k)) card[k] = f.get(k).trim();
  try {
    const r = await api("/v1/admin/models", { method: "POST", body: JSON.stringify(card) });
    $("#register-result").textContent = `registered ${r.registered.join(", ")} (hub v${r.hub_version})`;
    await loadHub();
  } catch (e) { report(e); }
}

// -- what-if ----------------------------------------------------------------------------------
async function loadWhatif() {
  const q = new URLSearchParams({ limit: $("#w-limit").value || "500" });
  if ($("#w-budget").value) q.set("budget_per_1k", $("#w-budget").value);
  else if ($("#w-lambda").value !== "") q.set("cost_weight", $("#w-lambda").value);
  const w = await api(`/v1/console/whatif?${q}`);
  if (!w.curve.length) { $("#w-summary").textContent = "no logged traffic yet: route some requests first"; return; }
  if ($("#w-lambda").value === "") $("#w-lambda").value = w.current_lambda;
  const at = w.at || w.current;
  if ($("#w-budget").value && w.at) $("#w-lambda").value = w.at.lambda;
  $("#w-summary").textContent = `${w.n_prompts} recent queries, checkpoint v${w.checkpoint_version}. ` +
    `Router λ ${fmt(w.current.lambda, 4)}: quality ${fmt(w.current.quality)}, cost per 1,000 ${fmt(w.current.cost_per_1k, 4)}. ` +
    `At λ ${fmt(at.lambda, 4)}: quality ${fmt(at.quality)}, cost per 1,000 ${fmt(at.cost_per_1k, 4)}.`;
  $("#w-summary").dataset.quality = at.quality;
  $("#w-summary").dataset.cost = at.cost_per_1k;
  // x must ascend and be unique (uPlot): one row per cost; the marked points lie on the same curve
  const rows = new Map();
  const put = (p, k) => {
    const r = rows.get(p.cost_per_1k) || [p.cost_per_1k, null, null, null];
    r[k] = k === 1 ? Math.max(r[1] ?? -Infinity, p.quality) : p.quality;
    if (r[1] === null) r[1] = p.quality;
    rows.set(p.cost_per_1k, r);
  };
  w.curve.forEach((p) => put(p, 1));
  put(w.current, 2);
  put(at, 3);
  const pts = [...rows.values()].sort((a, b) => a[0] - b[0]);
  const col = (k) => pts.map((r) => r[k]);
  const dot = (label, color) => ({ label, stroke: color, width: 0, paths: () => null, points: { show: true, size: 12, fill: color, stroke: color } });
  chart("w-curve", {
    scales: { x: { time: false } },
    axes: [{ label: "predicted cost per 1,000 requests" }, { label: "predicted quality" }],
    series: [{ label: "cost per 1,000" }, { label: "λ curve", stroke: COLORS[0], width: 2, spanGaps: true },
      dot("router's λ", COLORS[1]), dot("chosen λ", COLORS[3])],
  }, [col(0), col(1), col(2), col(3)]);
}

async function applyLambda() {
  const budget = $("#w-budget").value;
  const body = budget ? { budget_per_1k: Number(budget), limit: Number($("#w-limit").value || 1000), force: $("#w-force").checked }
    : { cost_weight: Number($("#w-lambda").value) };
  try {
    const r = await api("/v1/admin/calibration", { method: "POST", body: JSON.stringify(body) });
    $("#w-budget").value = "";
    $("#w-lambda").value = r.cost_weight;
    await loadWhatif();
    $("#w-summary").textContent = `applied λ = ${fmt(r.cost_weight, 4)}. ` + $("#w-summary").textContent;
  } catch (e) { report(e); }
}

// -- wiring -----------------------------------------------------------------------------------
$("#login-form").addEventListener("submit", (ev) => { ev.preventDefault(); login($("#key").value.trim()); });
$("#logout").addEventListener("click", () => logout());
for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.view));
for (const id of ["#f-model", "#f-tenant"]) $(id).addEventListener("change", resetDecisions);
$("#f-fallback").addEventListener("change", applyFallbackFilter);
$("#u-window").addEventListener("change", () => loadUsage().catch(report));
$("#u-refresh").addEventListener("click", () => loadUsage().catch(report));
$("#h-search").addEventListener("input", renderHub);
$("#register").addEventListener("submit", register);
$("#w-show").addEventListener("click", () => loadWhatif().catch(report));
$("#w-lambda").addEventListener("change", () => { $("#w-budget").value = ""; loadWhatif().catch(report); });
$("#w-budget").addEventListener("change", () => loadWhatif().catch(report));
$("#w-apply").addEventListener("click", applyLambda);
if (sessionStorage.getItem(KEY) !== null) login(sessionStorage.getItem(KEY));
