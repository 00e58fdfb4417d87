// lorakit workbench: a chat playground, side-by-side answers, adapter load / unload and training curves,
// all through the server's own /v1 endpoints (the API key the user types goes out as a Bearer token).
// Plain JS, no build step; text from the model or the server is only ever set as textContent.
"use strict";

const BASE = "__base__";
const MIX = "__mix__";
const FIRST_ADAPTER = "__first__";  // a picker's initial wish: the first loaded adapter (the base while there is none)
const $ = (id) => document.getElementById(id);
const state = { base: null, adapters: [], pickers: [], columns: [], chat: [], chatAbort: null, runTimer: null, runPath: null };

// --- HTTP -----------------------------------------------------------------------------------------
function headers(json) {
  const h = {};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function failure(response) {
  // OpenAI-shaped errors carry {error: {message}}; anything else is shown as its text
  const text = await response.text();
  try { return `${response.status}: ${JSON.parse(text).error.message}`; } catch (_) { return `${response.status}: ${text}`; }
}

async function api(method, path, body) {
  const response = await fetch(path, { method, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body) });
  if (!response.ok) throw new Error(await failure(response));
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

// A streamed chat completion: onText(piece) for each delta; resolves to {usage, finish} at [DONE].
async function streamChat(body, onText, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(true), signal,
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) throw new Error(await failure(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", usage = null, finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return { usage, finish };
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return { usage, finish };
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) onText(choice.delta.content);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
}

function show(id, text, isError) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

function element(tag, props = {}, children = []) {
  const el = Object.assign(document.createElement(tag), props);
  for (const child of children) el.append(child);
  return el;
}

function number(id, fallback) {
  const value = Number($(id).value);
  return Number.isFinite(value) ? value : fallback;
}

// --- models and the adapter picker --------------------------------------------------------------
async function refreshModels() {
  try {
    const listing = await api("GET", "/v1/models");
    const base = listing.data.find((m) => m.parent === null) || listing.data[0];
    state.base = base.id;
    state.adapters = listing.data.filter((m) => m !== base);
    $("base-name").textContent = `base: ${state.base}`;
    show("connection", `connected: ${state.adapters.length} adapter(s) loaded`);
  } catch (error) {
    show("connection", error.message, true);
    return;
  }
  state.pickers.forEach((picker) => picker.refresh());
  renderAdapterTable();
}

// A picker: the base, one adapter, or a weighted mix ({name: weight}, sent as lorakit's `adapters` field).
function makePicker(initial) {
  const select = element("select", { className: "model" });
  const rows = element("div", { className: "rows" });
  const add = element("button", { className: "secondary add-mix", textContent: "+ adapter" });
  const mix = element("div", { className: "mix hidden" }, [rows, add]);
  const root = element("div", { className: "picker" }, [select, mix]);
  const picker = { root, select, wanted: initial, touched: false };  // touched: the user chose, refreshes keep it

  function mixRow(name, weight) {
    const which = element("select", { className: "mix-adapter" });
    for (const adapter of state.adapters) which.append(element("option", { value: adapter.id, textContent: adapter.id }));
    if (name) which.value = name;
    const scale = element("input", { className: "mix-weight", type: "number", step: "0.1", value: String(weight) });
    const remove = element("button", { className: "secondary", textContent: "×", title: "remove from the mix" });
    const row = element("div", { className: "row mix-row" }, [which, scale, remove]);
    remove.onclick = () => row.remove();
    rows.append(row);
  }
  add.onclick = () => mixRow(null, 1.0);

  picker.refresh = () => {
    const first = state.adapters.length ? state.adapters[0].id : BASE;
    const keep = picker.touched ? select.value : picker.wanted === FIRST_ADAPTER ? first : picker.wanted;
    select.replaceChildren(element("option", { value: BASE, textContent: `base (${state.base})` }));
    for (const adapter of state.adapters) select.append(element("option", { value: adapter.id, textContent: adapter.id }));
    select.append(element("option", { value: MIX, textContent: "weighted mix…" }));
    const known = [BASE, MIX, ...state.adapters.map((a) => a.id)];
    select.value = known.includes(keep) ? keep : BASE;
    for (const which of rows.querySelectorAll(".mix-adapter")) {
      const chosen = which.value;
      which.replaceChildren(...state.adapters.map((a) => element("option", { value: a.id, textContent: a.id })));
      if (state.adapters.some((a) => a.id === chosen)) which.value = chosen;
    }
    select.onchange();
  };
  select.addEventListener("change", () => { picker.touched = true; });
  select.onchange = () => {
    mix.classList.toggle("hidden", select.value !== MIX);
    if (select.value === MIX && !rows.children.length) mixRow(state.adapters[0] && state.adapters[0].id, 1.0);
  };
  // The request fields for this choice, and a label for it.
  picker.spec = () => {
    if (select.value === BASE) return { body: { model: state.base }, label: "base" };
    if (select.value !== MIX) return { body: { model: select.value }, label: select.value };
    const adapters = {};
    for (const row of rows.querySelectorAll(".mix-row")) {
      const name = row.querySelector(".mix-adapter").value;
      if (name) adapters[name] = (adapters[name] || 0) + Number(row.querySelector(".mix-weight").value);
    }
    if (!Object.keys(adapters).length) throw new Error("add at least one adapter to the mix");
    const label = Object.entries(adapters).map(([n, w]) => `${w}·${n}`).join(" + ");
    return { body: { model: state.base, adapters }, label };
  };
  state.pickers.push(picker);
  if (state.base !== null) picker.refresh();
  return picker;
}

// --- chat ---------------------------------------------------------------------------------------
function addMessage(role, text, label) {
  const body = element("span", { className: "text", textContent: text });
  const who = element("span", { className: "who", textContent: role === "user" ? "you" : label });
  const message = element("div", { className: `message ${role}` }, [who, body]);
  $("chat-log").append(message);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return body;
}

async function sendChat(picker) {
  const text = $("chat-input").value.trim();
  if (!text || state.chatAbort) return;
  let spec;
  try { spec = picker.spec(); } catch (error) { show("chat-status", error.message, true); return; }
  $("chat-input").value = "";
  state.chat.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "", spec.label);
  state.chatAbort = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  show("chat-status", "generating…");
  const started = performance.now();
  try {
    const body = { ...spec.body, messages: state.chat, max_tokens: number("chat-max-tokens", 128),
                   temperature: number("chat-temperature", 0.7) };
    const { usage, finish } = await streamChat(body, (piece) => { out.textContent += piece; }, state.chatAbort.signal);
    state.chat.push({ role: "assistant", content: out.textContent });
    const tokens = usage ? usage.completion_tokens : "?";
    show("chat-status", `${tokens} tokens in ${((performance.now() - started) / 1000).toFixed(1)} s (${finish || "stopped"})`);
  } catch (error) {
    state.chat.pop();  // the question is asked again by the next send
    show("chat-status", error.name === "AbortError" ? "stopped" : error.message, error.name !== "AbortError");
  } finally {
    state.chatAbort = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
}

// --- side by side -------------------------------------------------------------------------------
function addColumn(initial) {
  const picker = makePicker(initial);
  const out = element("div", { className: "output" });
  const info = element("div", { className: "info" });
  const remove = element("button", { className: "secondary", textContent: "×", title: "remove this column" });
  const root = element("div", { className: "column" }, [element("div", { className: "head" }, [picker.root, remove]), out, info]);
  const column = { picker, out, info, root };
  remove.onclick = () => {
    root.remove();
    state.columns = state.columns.filter((c) => c !== column);
    state.pickers = state.pickers.filter((p) => p !== picker);
  };
  state.columns.push(column);
  $("compare-columns").append(root);
  return column;
}

async function runColumn(column, prompt) {
  column.out.textContent = "";
  column.info.textContent = "";
  column.root.dataset.state = "running";
  const started = performance.now();
  try {
    const { body } = column.picker.spec();
    const ask = { ...body, messages: [{ role: "user", content: prompt }], max_tokens: number("compare-max-tokens", 128),
                  temperature: number("compare-temperature", 0) };
    const { usage } = await streamChat(ask, (piece) => { column.out.textContent += piece; });
    const seconds = (performance.now() - started) / 1000;
    column.info.textContent = `${usage ? usage.completion_tokens : "?"} tokens in ${seconds.toFixed(1)} s`;
    column.root.dataset.state = "done";
  } catch (error) {
    column.info.textContent = error.message;
    column.root.dataset.state = "error";
  }
}

async function runAll() {
  const prompt = $("compare-prompt").value.trim();
  if (!prompt) { show("compare-status", "type a prompt first", true); return; }
  $("compare-run").disabled = true;
  show("compare-status", `${state.columns.length} requests sent together…`);
  // every request starts before any is awaited: they reach the engine together and decode as one batch
  await Promise.all(state.columns.map((column) => runColumn(column, prompt)));
  show("compare-status", "done");
  $("compare-run").disabled = false;
}

// --- adapters -----------------------------------------------------------------------------------
function renderAdapterTable() {
  const body = $("adapter-table").querySelector("tbody");
  body.replaceChildren(element("tr", {}, [element("td", { textContent: `${state.base} (base)` }), element("td"), element("td")]));
  for (const adapter of state.adapters) {
    const unload = element("button", { className: "secondary unload", textContent: "Unload" });
    unload.dataset.name = adapter.id;
    unload.onclick = () => unloadAdapter(adapter.id);
    const row = element("tr", {}, [element("td", { className: "name", textContent: adapter.id }),
                                   element("td", { className: "path", textContent: adapter.root || "" }), element("td", {}, [unload])]);
    row.dataset.name = adapter.id;
    body.append(row);
  }
}

async function loadAdapter() {
  const name = $("load-name").value.trim(), path = $("load-path").value.trim() || name;
  show("adapters-status", `loading ${name}…`);
  try {
    show("adapters-status", await api("POST", "/v1/load_lora_adapter", { lora_name: name, lora_path: path }));
    await refreshModels();
  } catch (error) {
    show("adapters-status", error.message, true);
  }
}

async function unloadAdapter(name) {
  try {
    show("adapters-status", await api("POST", "/v1/unload_lora_adapter", { lora_name: name }));
    await refreshModels();
  } catch (error) {
    show("adapters-status", error.message, true);
  }
}

// --- runs ---------------------------------------------------------------------------------------
async function refreshRuns() {
  try {
    const listing = await api("GET", "/v1/runs");
    const select = $("run-select");
    select.replaceChildren(...listing.runs.map((run) => element("option", {
      value: run.path, textContent: `${run.path || "(the runs root)"} · ${new Date(run.updated * 1000).toLocaleString()}`,
    })));
    show("runs-status", `${listing.runs.length} run(s) under ${listing.root}`);
  } catch (error) {
    show("runs-status", error.message, true);
  }
}

async function openRun(path) {
  clearTimeout(state.runTimer);
  state.runPath = path;
  try {
    const run = await api("GET", "/v1/runs/metrics?path=" + encodeURIComponent(path));
    if (state.runPath !== path) return;  // another run was opened meanwhile
    drawRun(run.records);
    show("runs-status", `${path || "(the runs root)"}: updated ${new Date(run.updated * 1000).toLocaleTimeString()}`);
  } catch (error) {
    show("runs-status", error.message, true);
    return;
  }
  if ($("run-live").checked) state.runTimer = setTimeout(() => openRun(path), 2000);
}

function drawRun(records) {
  const train = records.filter((r) => typeof r.loss === "number").map((r) => [r.step, r.loss]);
  const evals = records.filter((r) => typeof r.eval_loss === "number").map((r) => [r.step, r.eval_loss]);
  const last = (list) => (list.length ? list[list.length - 1] : null);
  const parts = [`${records.length} records`];
  if (last(train)) parts.push(`step ${last(train)[0]}`, `loss ${last(train)[1].toFixed(4)}`);
  if (last(evals)) parts.push(`eval loss ${last(evals)[1].toFixed(4)} (step ${last(evals)[0]})`);
  $("run-summary").textContent = parts.join(" · ");
  $("run-summary").dataset.trainPoints = String(train.length);
  $("run-summary").dataset.evalPoints = String(evals.length);
  chart($("run-chart"), [{ points: train, color: "#2f6fde", label: "train loss" },
                         { points: evals, color: "#e07b39", label: "eval loss", dots: true }]);
}

// A line chart of (step, loss) series on a canvas: axes with five ticks each, a legend.
function chart(canvas, series) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = { l: 60, r: 16, t: 16, b: 36 };
  ctx.clearRect(0, 0, W, H);
  const all = series.flatMap((s) => s.points);
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#6b7280";
  if (!all.length) { ctx.fillText("no loss recorded yet", pad.l, H / 2); return; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const margin = (y1 - y0) * 0.05;
  y0 -= margin; y1 += margin;
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (W - pad.l - pad.r);
  const Y = (y) => H - pad.b - ((y - y0) / (y1 - y0)) * (H - pad.t - pad.b);
  ctx.strokeStyle = "#d9dde5";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4, x = x0 + ((x1 - x0) * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.l, Y(y)); ctx.lineTo(W - pad.r, Y(y)); ctx.stroke();
    ctx.fillText(y.toPrecision(4), 4, Y(y) + 4);
    ctx.fillText(String(Math.round(x)), X(x) - 8, H - pad.b + 16);
  }
  ctx.fillText("optimizer step", W / 2 - 40, H - 6);
  series.forEach((s, i) => {
    ctx.strokeStyle = ctx.fillStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    s.points.forEach(([x, y], j) => (j ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    if (s.dots) s.points.forEach(([x, y]) => { ctx.beginPath(); ctx.arc(X(x), Y(y), 3.5, 0, 2 * Math.PI); ctx.fill(); });
    ctx.fillRect(W - pad.r - 110, pad.t + 4 + i * 18, 12, 3);
    ctx.fillText(s.label, W - pad.r - 92, pad.t + 9 + i * 18);
  });
}

// --- wiring -------------------------------------------------------------------------------------
function showTab(name) {
  for (const tab of document.querySelectorAll("nav .tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  for (const panel of document.querySelectorAll(".panel")) panel.classList.toggle("hidden", panel.id !== `tab-${name}`);
  if (name === "runs") refreshRuns();
}

function start() {
  $("api-key").value = sessionStorage.getItem("lorakit-key") || "";
  $("connect").onclick = () => { sessionStorage.setItem("lorakit-key", $("api-key").value.trim()); refreshModels(); };
  $("api-key").onkeydown = (event) => { if (event.key === "Enter") $("connect").click(); };
  for (const tab of document.querySelectorAll("nav .tab")) tab.onclick = () => showTab(tab.dataset.tab);

  const chatPicker = makePicker(BASE);
  $("chat-picker").append(chatPicker.root);
  $("chat-send").onclick = () => sendChat(chatPicker);
  $("chat-stop").onclick = () => state.chatAbort && state.chatAbort.abort();
  $("chat-clear").onclick = () => { state.chat = []; $("chat-log").replaceChildren(); show("chat-status", ""); };
  $("chat-input").onkeydown = (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); sendChat(chatPicker); }
  };

  addColumn(BASE);
  addColumn(FIRST_ADAPTER);
  $("compare-add").onclick = () => addColumn(BASE);
  $("compare-run").onclick = runAll;

  $("load-button").onclick = loadAdapter;
  $("runs-refresh").onclick = refreshRuns;
  $("run-open").onclick = () => openRun($("run-path").value.trim() || $("run-select").value);
  $("run-select").onchange = () => { $("run-path").value = ""; openRun($("run-select").value); };
  $("run-live").onchange = () => { if ($("run-live").checked && state.runPath !== null) openRun(state.runPath); else clearTimeout(state.runTimer); };
  refreshModels();
}

start();
