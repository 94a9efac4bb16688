// tunelab's dashboard: one page, routed by the URL's hash, over the JSON endpoints of serve/routes/dashboard.py.
// When the server has an API key, every data request needs it: the page asks for it once (a small form),
// keeps it in this tab's sessionStorage and sends it as `Authorization: Bearer KEY` on every fetch; files
// and plots are fetched the same way and shown from the blobs.
//   #/                      runs (sortable, filterable; pick several to compare)
//   #/run/NAME              a run: live curves, config, summary, checkpoints, evaluation, files, job events
//   #/compare?run=A&run=B   curves overlaid (by step or by tokens) and the config keys that differ
//   #/playground?model=M    chat with served models, one prompt to two models side by side (streamed)
//   #/new                   a new fine-tuning job: files checked by line before anything is submitted, then
//                           created through the jobs API (POST /v1/files, POST /v1/fine_tuning/jobs)
// A job's run page has its cancel, pause and resume buttons; a finished run's, its downloads (exports).
"use strict";

const main = document.getElementById("main");
let stopPolling = () => {};  // the current view's timers, cleared when the view changes

const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const fmt = (v, digits = 4) => v == null ? "" : typeof v === "number" ? (Number.isInteger(v) ? v.toLocaleString() : v.toFixed(digits)) : String(v);
const when = (t) => t ? new Date(t * 1000).toLocaleString() : "";
const duration = (s) => s == null ? "" : s < 90 ? `${s.toFixed(0)} s` : s < 5400 ? `${(s / 60).toFixed(1)} min` : `${(s / 3600).toFixed(1)} h`;
const cell = (v) => esc(typeof v === "number" ? fmt(v, 2) : v && typeof v === "object" ? JSON.stringify(v) : v);
const runLink = (name) => `#/run/${encodeURIComponent(name)}`;
const size = (b) => b < 1e6 ? `${(b / 1e3).toFixed(0)} kB` : b < 1e9 ? `${(b / 1e6).toFixed(1)} MB` : `${(b / 1e9).toFixed(2)} GB`;
const errorOf = async (response) => {
  const body = await response.json().catch(() => ({}));
  return body.error ? body.error.message : `${response.status} ${response.statusText}`;
};
// a y axis readable at any scale: a learning rate of 2e-4 is not "0"
const stepAxis = {label: "step", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5]};
const yAxis = {values: (u, values) => values.map((v) => v == null ? "" : v !== 0 && Math.abs(v) < 0.01 ? v.toExponential(1) : +v.toPrecision(4)), size: 60};

// --- the key ------------------------------------------------------------------------------------------

const KEY = "tunelab-key";
class KeyNeeded extends Error {}
const apiKey = () => sessionStorage.getItem(KEY) || "";
const authHeaders = (headers = {}) => apiKey() ? {...headers, Authorization: "Bearer " + apiKey()} : headers;

async function authedFetch(url, options = {}) {
  const response = await fetch(url, {...options, headers: authHeaders(options.headers)});
  if (response.status === 401) throw new KeyNeeded(apiKey() ? "The server refused that key." : "");
  return response;
}

async function getJSON(url) {
  const response = await authedFetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

function keyView(message) {
  // the server has a key and this tab has none (or a wrong one): ask, keep it for the tab, show the view again
  main.innerHTML = `<h1>API key</h1>
    <p class="muted">This server needs its API key (the one it was started with: <code>--api-key</code> or
    <code>TUNELAB_API_KEY</code>). It is kept for this browser tab only.</p>
    ${message ? `<p class="error" id="key-error">${esc(message)}</p>` : ""}
    <form id="key-form" class="toolbar"><input id="key-input" type="password" autocomplete="current-password"
      placeholder="API key" size="40" required><button type="submit">Continue</button></form>`;
  const input = document.getElementById("key-input");
  input.focus();
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, input.value.trim());
    route();
  });
}

async function blobURL(url) {
  const response = await authedFetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${response.statusText}`);
  return URL.createObjectURL(await response.blob());
}

function showAuthedImages(box) {
  // <img data-src>: a plot fetched with the key (an <img src> could not send it)
  box.querySelectorAll("img[data-src]").forEach((img) => blobURL(img.dataset.src).then((u) => { img.src = u; }).catch(() => {}));
}

document.addEventListener("click", (event) => {
  // a run's file (report, plot, metrics JSON) opened in a new tab, fetched with the key when there is one
  const link = event.target.closest("a[data-file]");
  if (!link || !apiKey()) return;
  event.preventDefault();
  const opened = window.open("", "_blank");  // opened now, while the click still counts as the user's
  blobURL(link.getAttribute("href")).then((u) => { opened.location = u; })
    .catch((e) => { opened.close(); if (e instanceof KeyNeeded) keyView(e.message); });
});

document.addEventListener("click", (event) => {
  // a download (an export) saved from a blob fetched with the key; without a key the link downloads itself
  const link = event.target.closest("a[data-download]");
  if (!link || !apiKey()) return;
  event.preventDefault();
  blobURL(link.getAttribute("href")).then((u) => {
    const save = document.createElement("a");
    save.href = u;
    save.download = link.getAttribute("download") || "";
    document.body.appendChild(save);
    save.click();
    save.remove();
    setTimeout(() => URL.revokeObjectURL(u), 60000);
  }).catch((e) => { if (e instanceof KeyNeeded) keyView(e.message); else link.insertAdjacentHTML("afterend", ` <span class="error">${esc(e.message)}</span>`); });
});

function route() {
  stopPolling();
  stopPolling = () => {};
  const hash = location.hash || "#/";
  const [path, query] = hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active",
    a.dataset.nav === (path.startsWith("/run/") ? "runs" : path.slice(1) || "runs")));
  const show = path.startsWith("/run/") ? () => runView(decodeURIComponent(path.slice(5)))
    : path === "/compare" ? () => compareView(params.getAll("run"))
    : path === "/playground" ? () => playgroundView(params.get("model"), params.get("base"))
    : path === "/new" ? () => newJobView()
    : () => runsView();
  show().catch((e) => { e instanceof KeyNeeded ? keyView(e.message) : main.innerHTML = `<p class="error">${esc(e.message)}</p>`; });
}
window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);

// --- the runs ---------------------------------------------------------------------------------------

const COLUMNS = [
  ["name", "run"], ["method", "method"], ["model", "model"], ["tuning", "tuning"], ["status", "status"],
  ["step", "step", "num"], ["best", "best", "num"], ["tokens_per_s", "tokens/s", "num"],
  ["wall_seconds", "wall time", "num"], ["started_at", "started", "num"],
];
const runsState = {sort: "started_at", asc: false, method: "", model: "", picked: new Set()};

async function runsView() {
  main.innerHTML = `<h1>Runs</h1>
    <div class="toolbar">
      <label>method <select id="filter-method"><option value="">all</option></select></label>
      <label>model <select id="filter-model"><option value="">all</option></select></label>
      <button id="compare-picked" disabled>Compare selected</button>
      <span class="muted" id="runs-count"></span>
    </div>
    <div id="reports"></div>
    <table id="runs"><thead><tr><th></th>${COLUMNS.map(([key, label, kind]) =>
      `<th class="sortable ${kind || ""}" data-key="${key}">${label}</th>`).join("")}</tr></thead><tbody></tbody></table>`;
  const methodSelect = document.getElementById("filter-method"), modelSelect = document.getElementById("filter-model");
  const compareButton = document.getElementById("compare-picked");
  let runs = [];
  const render = () => {
    const shown = runs.filter((r) => (!runsState.method || r.method === runsState.method) && (!runsState.model || r.model === runsState.model));
    const key = runsState.sort;
    shown.sort((a, b) => {
      const x = a[key] ?? "", y = b[key] ?? "";
      return (x < y ? -1 : x > y ? 1 : 0) * (runsState.asc ? 1 : -1);
    });
    document.querySelector("#runs tbody").innerHTML = shown.map((r) => `<tr data-run="${esc(r.name)}">
      <td><input type="checkbox" class="pick" data-run="${esc(r.name)}" ${runsState.picked.has(r.name) ? "checked" : ""}></td>
      <td><a href="${runLink(r.name)}">${esc(r.name)}</a></td><td>${esc(r.method)}</td><td>${esc(r.model)}</td>
      <td>${esc(r.tuning)}</td><td><span class="status ${esc(r.status)}">${esc(r.status)}</span></td>
      <td class="num">${fmt(r.step)}${r.total_steps ? " / " + fmt(r.total_steps) : ""}</td>
      <td class="num" title="${esc(r.best_metric)}">${fmt(r.best)}</td><td class="num">${fmt(r.tokens_per_s, 1)}</td>
      <td class="num">${duration(r.wall_seconds)}</td><td class="num">${when(r.started_at)}</td></tr>`).join("");
    document.getElementById("runs-count").textContent = `${shown.length} of ${runs.length} runs`;
    document.querySelectorAll("#runs th.sortable").forEach((th) => {
      th.classList.toggle("sorted", th.dataset.key === key);
      th.classList.toggle("asc", th.dataset.key === key && runsState.asc);
    });
    document.querySelectorAll("input.pick").forEach((box) => box.addEventListener("change", () => {
      box.checked ? runsState.picked.add(box.dataset.run) : runsState.picked.delete(box.dataset.run);
      compareButton.disabled = runsState.picked.size < 2;
    }));
    compareButton.disabled = runsState.picked.size < 2;
  };
  const options = (select, values, current) => {
    select.innerHTML = `<option value="">all</option>` + [...new Set(values.filter(Boolean))].sort()
      .map((v) => `<option ${v === current ? "selected" : ""}>${esc(v)}</option>`).join("");
  };
  const load = async () => {
    const answer = await getJSON("/api/runs");
    runs = answer.runs;
    document.getElementById("reports").innerHTML = answer.reports.length ? `<p>Comparisons: ${answer.reports.map((r) =>
      `<a class="report" data-file href="/api/reports/${encodeURIComponent(r.name)}/report.html" target="_blank">${esc(r.name)}</a>`).join(" · ")}</p>` : "";
    options(methodSelect, runs.map((r) => r.method), runsState.method);
    options(modelSelect, runs.map((r) => r.model), runsState.model);
    render();
  };
  document.querySelectorAll("#runs th.sortable").forEach((th) => th.addEventListener("click", () => {
    runsState.asc = runsState.sort === th.dataset.key ? !runsState.asc : true;
    runsState.sort = th.dataset.key;
    render();
  }));
  methodSelect.addEventListener("change", () => { runsState.method = methodSelect.value; render(); });
  modelSelect.addEventListener("change", () => { runsState.model = modelSelect.value; render(); });
  compareButton.addEventListener("click", () => {
    location.hash = "#/compare?" + [...runsState.picked].map((n) => "run=" + encodeURIComponent(n)).join("&");
  });
  await load();
  const timer = setInterval(() => load().catch(() => {}), 5000);
  stopPolling = () => clearInterval(timer);
}

// --- one run ----------------------------------------------------------------------------------------

// Curves, from the metrics rows: [title, x of a row, [[label, y of a row, split]]]
const CURVES = [
  ["loss", [["train loss", "loss", "train"], ["eval loss", "loss", "eval"]]],
  ["accuracy", [["train accuracy", "accuracy", "train"], ["eval accuracy", "accuracy", "eval"]]],
  ["learning rate", [["lr", "lr", "train"]]],
  ["tokens/s", [["tokens/s", "tokens_per_s", "train"]]],
  ["reward (rlhf, grpo)", [["train reward", "reward", "train"], ["eval reward", "reward", "eval"]]],
  ["completion length (grpo)", [["train", "completion_length", "train"], ["eval", "completion_length", "eval"]]],
  ["clipped fraction (grpo)", [["clipped", "clip", "train"], ["truncated", "truncated", "train"]]],
  ["margin (reward, dpo)", [["eval margin", "margin", "eval"]]],
];

class LiveChart {
  // One uPlot chart of some series against the step, fed rows as they arrive.
  constructor(parent, id, title, series) {
    this.series = series;
    this.points = new Map();  // step -> [value per series]
    this.box = document.createElement("div");
    this.box.className = "chart";
    this.box.id = id;
    this.box.innerHTML = `<h3>${esc(title)}</h3>`;
    this.box.style.display = "none";  // shown with its first point: a run without accuracy shows no empty chart
    parent.appendChild(this.box);
    this.plot = null;
  }
  add(rows) {
    let changed = false;
    for (const row of rows) {
      this.series.forEach(([, key, split], i) => {
        if (row.split === split && typeof row[key] === "number") {
          const values = this.points.get(row.step) || this.series.map(() => null);
          values[i] = row[key];
          this.points.set(row.step, values);
          changed = true;
        }
      });
    }
    if (changed) this.draw();
  }
  draw() {
    const steps = [...this.points.keys()].sort((a, b) => a - b);
    const data = [steps, ...this.series.map((_, i) => steps.map((s) => this.points.get(s)[i]))];
    this.box.dataset.points = String(steps.length);
    this.box.style.display = "";
    if (this.plot) { this.plot.setData(data); return; }
    const colours = ["#3b5bdb", "#e8590c", "#2b8a3e", "#ae3ec9"];
    this.plot = new uPlot({
      width: Math.max(this.box.clientWidth - 16, 300), height: 220,
      scales: {x: {time: false}},
      series: [{label: "step"}, ...this.series.map(([label], i) => ({label, stroke: colours[i % 4], width: 2, spanGaps: true,
        points: {show: true, size: 4}}))],
      axes: [stepAxis, yAxis],
    }, data, this.box);
  }
}

async function runView(name) {
  const run = await getJSON(`/api/runs/${encodeURIComponent(name)}`);
  const cards = [
    ["status", `<span class="status ${esc(run.status)}" id="run-status">${esc(run.status)}</span>`],
    ["method", esc(run.method)], ["model", esc(run.model)], ["tuning", esc(run.tuning)],
    ["step", `<span id="run-step">${fmt(run.step)}${run.total_steps ? " / " + fmt(run.total_steps) : ""}</span>`],
    [`best ${esc(run.best_metric)}`, fmt(run.best)], ["tokens/s", fmt(run.tokens_per_s, 1)],
    ["wall time", duration(run.wall_seconds)], ["started", when(run.started_at)],
  ];
  const failure = run.job && run.job.error ? run.job.error.message : run.failure ? run.failure.error : null;
  main.innerHTML = `<h1>${esc(name)}</h1>
    <div class="cards">${cards.map(([label, value]) => `<div class="card"><div class="label">${label}</div><div class="value">${value}</div></div>`).join("")}</div>
    ${run.job ? jobActions(run.job) : ""}
    ${failure ? `<p class="error" id="run-failure">failed: ${esc(failure)}</p>` : ""}
    <div class="charts" id="charts"></div>
    <div id="exports"></div>
    <div id="evaluation"></div>
    <h2>Files</h2><p id="files">${run.files.length ? run.files.map((f) =>
      `<a data-file href="/api/runs/${encodeURIComponent(name)}/files/${f}" target="_blank">${f}</a>`).join(" · ") : "<span class='muted'>none yet</span>"}</p>
    <div class="two"><div><h2>Config</h2><pre id="config">${esc(Object.keys(run.config).length ? JSON.stringify(run.config, null, 2) : "(written when the job starts)")}</pre></div>
      <div><h2>Summary</h2><pre id="summary">${esc(run.summary ? JSON.stringify(run.summary, null, 2) : "(written when the run finishes)")}</pre>
      <h2>Checkpoints</h2><p id="checkpoints">${run.checkpoints.map((c) => `step ${fmt(c.step)}`).join(" · ") || "<span class='muted'>none</span>"}</p></div></div>
    ${run.events ? `<h2>Job events</h2><table id="events"><tbody>${eventRows(run.events)}</tbody></table>` : ""}`;
  evaluationView(document.getElementById("evaluation"), run, name);
  if (run.job) document.querySelectorAll("#job-actions button[data-action]").forEach((button) => button.addEventListener("click", async () => {
    button.disabled = true;
    const response = await authedFetch(`/v1/fine_tuning/jobs/${encodeURIComponent(run.job.id)}/${button.dataset.action}`, {method: "POST"});
    if (!response.ok) {
      document.getElementById("action-error").textContent = await errorOf(response);
      button.disabled = false;
      return;
    }
    route();  // the page again, in the job's new state
  }));
  const parent = document.getElementById("charts");
  const charts = CURVES.map(([title, series], i) => new LiveChart(parent, `chart-${i}`, title, series));
  let byFunction = null;
  let offset = 0, stopped = false, stopExports = () => {};
  if (run.summary || (run.job && run.job.status === "succeeded")) stopExports = exportsView(document.getElementById("exports"), name);
  const poll = async () => {
    // metrics after `offset`, then the next piece until none is left; new points appear without a reload
    for (;;) {
      const piece = await getJSON(`/api/runs/${encodeURIComponent(name)}/metrics?offset=${offset}`);
      if (piece.status !== run.status && !stopped) return route();  // a new state: config, summary, downloads
      if (piece.offset < offset) charts.forEach((c) => c.points.clear());  // the file was cut back (a resume)
      const grew = piece.offset !== offset;
      offset = piece.offset;
      if (!byFunction) {  // grpo: one curve per reward function (reward/NAME), train and held out
        const names = [...new Set(piece.rows.flatMap((r) => Object.keys(r).filter((k) => k.startsWith("reward/"))))];
        if (names.length) {
          byFunction = new LiveChart(parent, "chart-functions", "rewards by function (grpo)",
            names.flatMap((k) => [[`train ${k.slice(7)}`, k, "train"], [`eval ${k.slice(7)}`, k, "eval"]]));
          charts.push(byFunction);
        }
      }
      charts.forEach((c) => c.add(piece.rows));
      const status = document.getElementById("run-status");
      if (status && status.textContent !== piece.status) { status.textContent = piece.status; status.className = `status ${piece.status}`; }
      const last = piece.rows.filter((r) => r.split === "train").pop();
      if (last) document.getElementById("run-step").textContent = fmt(last.step) + (run.total_steps ? " / " + fmt(run.total_steps) : "");
      if (!grew || !piece.rows.length) break;
    }
  };
  const events = async () => {  // a job's events, newest first, as they come
    const now = await getJSON(`/api/runs/${encodeURIComponent(name)}`);
    const table = document.querySelector("#events tbody");
    if (table && !stopped) table.innerHTML = eventRows(now.events || []);
  };
  await poll();
  let ticks = 0;
  const timer = setInterval(() => {
    if (stopped) return;
    poll().catch(() => {});
    if (run.job && ++ticks % 2 === 0) events().catch(() => {});
  }, 1500);
  stopPolling = () => { stopped = true; clearInterval(timer); stopExports(); };
}

const eventRows = (events) => events.map((e) =>
  `<tr><td>${when(e.created_at)}</td><td>${esc(e.type)}</td><td>${esc(e.message)}</td></tr>`).join("");

const ACTIONS = [  // what a job's state allows (the runner's rules)
  ["pause", "Pause", ["queued", "running"]],
  ["resume", "Resume", ["paused"]],
  ["cancel", "Cancel", ["validating_files", "queued", "running", "paused"]],
];

function jobActions(job) {
  const model = job.fine_tuned_model;
  return `<div class="toolbar" id="job-actions">${ACTIONS.map(([action, label, states]) =>
    `<button data-action="${action}" class="${action === "cancel" ? "danger" : "secondary"}" ${states.includes(job.status) ? "" : "disabled"}>${label}</button>`).join("")}
    ${model ? `<span>Fine-tuned model <code id="job-model">${esc(model)}</code>:
      <a id="try-model" href="#/playground?model=${encodeURIComponent(model)}&base=${encodeURIComponent(job.model)}">try it in the playground</a></span>` : ""}
    <span class="error" id="action-error"></span></div>`;
}

function exportsView(box, name) {
  // a finished run's downloads: each made on the server when asked (one at a time), with its progress
  const base = `/api/runs/${encodeURIComponent(name)}/exports`;
  let timer = null, stopped = false;
  const cellOf = (e) => !e.available ? `<span class="muted">${esc(e.why)}</span>`
    : e.state === "done" ? `<a class="download" data-download href="${base}/${e.kind}/file" download="${esc(e.filename)}">${esc(e.filename)}</a>
        <span class="muted">${size(e.size)}</span>${e.parts.includes("modelfile") ? ` · <a data-download href="${base}/${e.kind}/modelfile"
        download="${esc(e.filename.replace(/\.gguf$/, ".Modelfile"))}">Modelfile</a>` : ""}`
    : e.state === "queued" || e.state === "running" ? `<progress max="1" value="${e.progress}"></progress>
        <span class="muted">${esc(e.stage)}${e.written ? ", " + size(e.written) : ""}</span>`
    : `<button class="secondary" data-export="${e.kind}">Prepare</button>${e.state === "failed" ? ` <span class="error">${esc(e.error)}</span>` : ""}`;
  const load = async () => {
    const list = (await getJSON(base)).exports;
    if (stopped) return;
    box.innerHTML = `<h2>Downloads</h2><table id="exports-table"><tbody>${list.map((e) =>
      `<tr data-kind="${e.kind}" data-state="${e.state}"><td>${esc(e.label)}</td><td>${cellOf(e)}</td></tr>`).join("")}</tbody></table>`;
    box.querySelectorAll("button[data-export]").forEach((button) => button.addEventListener("click", async () => {
      button.disabled = true;
      const response = await authedFetch(`${base}/${button.dataset.export}`, {method: "POST"});
      if (!response.ok) button.insertAdjacentHTML("afterend", ` <span class="error">${esc(await errorOf(response))}</span>`);
      else load().catch(() => {});
    }));
    clearTimeout(timer);
    if (list.some((e) => e.state === "queued" || e.state === "running")) timer = setTimeout(() => load().catch(() => {}), 1000);
  };
  load().catch((e) => { box.innerHTML = `<p class="error">${esc(e.message)}</p>`; });
  return () => { stopped = true; clearTimeout(timer); };
}

function evaluationView(box, run, name) {
  const parts = [];
  const evaluation = run.evaluation || {};
  const numbers = Object.entries(evaluation).filter(([, v]) => typeof v === "number");
  if (numbers.length) parts.push(`<h2>Evaluation</h2><table id="eval-metrics"><tbody>${numbers.map(([k, v]) =>
    `<tr><td>${esc(k)}</td><td class="num">${fmt(v)}</td></tr>`).join("")}</tbody></table>`);
  if (run.files.includes("confusion_matrix.png")) parts.push(`<h2>Confusion matrix</h2><img class="plot" alt="confusion matrix"
    data-src="/api/runs/${encodeURIComponent(name)}/files/confusion_matrix.png">`);
  if (run.predictions && run.predictions.length) {
    const keys = Object.keys(run.predictions[0]).filter((k) => k !== "where").slice(0, 4);  // not the file and line
    parts.push(`<h2>Predictions (a sample)</h2><table id="predictions"><thead><tr>${keys.map((k) => `<th>${esc(k)}</th>`).join("")}</tr></thead>
      <tbody>${run.predictions.map((p) => `<tr>${keys.map((k) => `<td>${cell(p[k])}</td>`).join("")}</tr>`).join("")}</tbody></table>`);
  }
  for (const e of run.evaluations || []) {
    if (e.per_task) {
      parts.push(`<h2>Held-out suite ${esc(e.name)}</h2><p class="muted">${esc(e.data)}: ROUGE-L ${fmt(e.overall && e.overall.rougeL)},
        exact match ${fmt(e.overall && e.overall.exact_match)} (${fmt(e.overall && e.overall.instances)} instances)</p>
        <table class="suite"><thead><tr><th>task</th><th class="num">ROUGE-L</th><th class="num">exact match</th><th class="num">instances</th></tr></thead>
        <tbody>${Object.entries(e.per_task).map(([task, s]) => `<tr><td>${esc(task)}</td><td class="num">${fmt(s.rougeL)}</td>
        <td class="num">${fmt(s.exact_match)}</td><td class="num">${fmt(s.instances)}</td></tr>`).join("")}</tbody></table>`);
    } else if (e.metrics) {
      parts.push(`<h2>Evaluation ${esc(e.name)}</h2><p class="muted">${esc(e.data)}</p><table><tbody>${Object.entries(e.metrics)
        .map(([k, v]) => `<tr><td>${esc(k)}</td><td class="num">${fmt(v)}</td></tr>`).join("")}</tbody></table>`);
    }
    if (e.predictions && e.predictions.length) {
      const keys = Object.keys(e.predictions[0]);
      parts.push(`<table class="predictions"><thead><tr>${keys.map((k) => `<th>${esc(k)}</th>`).join("")}</tr></thead><tbody>${e.predictions
        .map((p) => `<tr>${keys.map((k) => `<td>${cell(p[k])}</td>`).join("")}</tr>`).join("")}</tbody></table>`);
    }
  }
  if (run.report) parts.push(`<p><a data-file href="/api/reports/${encodeURIComponent(run.report)}/report.html" target="_blank">The comparison's report (${esc(run.report)})</a></p>`);
  if (run.files.includes("report.html")) parts.push(`<p><a data-file href="/api/runs/${encodeURIComponent(name)}/files/report.html" target="_blank">The comparison's report</a></p>`);
  box.innerHTML = parts.join("");
  showAuthedImages(box);
}

// --- compare ----------------------------------------------------------------------------------------

async function compareView(names) {
  if (names.length < 2) {
    main.innerHTML = `<h1>Compare runs</h1><p class="muted">Pick two runs or more on the <a href="#/">runs page</a>.</p>`;
    return;
  }
  const result = await getJSON("/api/compare?" + names.map((n) => "run=" + encodeURIComponent(n)).join("&"));
  const keys = Object.entries(result.differing);
  main.innerHTML = `<h1>Compare ${names.length} runs</h1>
    <div class="toolbar"><label>x axis <select id="x-axis"><option value="step">step</option><option value="tokens">tokens</option></select></label></div>
    <div class="charts"><div class="chart" id="compare-chart"><h3>train loss</h3></div><div class="chart" id="compare-eval"><h3>eval loss</h3></div></div>
    <h2>Config keys that differ</h2>
    <table id="differing"><thead><tr><th>key</th>${names.map((n) => `<th>${esc(n)}</th>`).join("")}</tr></thead>
    <tbody>${keys.length ? keys.map(([key, values]) => `<tr data-key="${esc(key)}"><td>${esc(key)}</td>${names.map((n) =>
      `<td>${esc(JSON.stringify(values[n]))}</td>`).join("")}</tr>`).join("") : `<tr><td colspan="${names.length + 1}" class="muted">the configs are the same</td></tr>`}</tbody></table>`;
  const rows = {};
  for (const name of names) {
    rows[name] = [];
    let offset = 0;
    for (;;) {
      const piece = await getJSON(`/api/runs/${encodeURIComponent(name)}/metrics?offset=${offset}`);
      rows[name].push(...piece.rows);
      if (piece.offset === offset || !piece.rows.length) break;
      offset = piece.offset;
    }
  }
  const colours = ["#3b5bdb", "#e8590c", "#2b8a3e", "#ae3ec9", "#1098ad", "#f08c00"];
  const plots = [];
  const draw = () => {
    const axis = document.getElementById("x-axis").value;
    for (const [id, split] of [["compare-chart", "train"], ["compare-eval", "eval"]]) {
      const box = document.getElementById(id);
      box.querySelectorAll(".uplot").forEach((e) => e.remove());
      // tokens: an eval row takes the tokens of the train row at its step
      const xOf = (name, row) => axis === "step" ? row.step : (rows[name].filter((r) => r.split === "train" && r.step <= row.step).pop() || {tokens: 0}).tokens;
      const xs = [...new Set(names.flatMap((n) => rows[n].filter((r) => r.split === split && typeof r.loss === "number").map((r) => xOf(n, r))))].sort((a, b) => a - b);
      const series = names.map((n) => {
        const byX = new Map(rows[n].filter((r) => r.split === split && typeof r.loss === "number").map((r) => [xOf(n, r), r.loss]));
        return xs.map((x) => byX.has(x) ? byX.get(x) : null);
      });
      box.dataset.points = String(xs.length);
      plots.push(new uPlot({width: Math.max(box.clientWidth - 16, 300), height: 240, scales: {x: {time: false}},
        series: [{label: axis}, ...names.map((n, i) => ({label: n, stroke: colours[i % colours.length], width: 2, spanGaps: true}))],
        axes: [axis === "step" ? stepAxis : {label: axis}, yAxis]}, [xs, ...series], box));
    }
  };
  draw();
  document.getElementById("x-axis").addEventListener("change", draw);
}

// --- a new fine-tuning job -------------------------------------------------------------------------

// The hyperparameters of the jobs API (OpenAI's, and tunelab's tuning_mode and lora_rank): [name, label, methods, step]
const HYPERPARAMETERS = [
  ["n_epochs", "epochs", ["supervised", "dpo", "reinforcement"], 1],
  ["batch_size", "batch size", ["supervised", "dpo", "reinforcement"], 1],
  ["learning_rate_multiplier", "learning rate multiplier", ["supervised", "dpo", "reinforcement"], "any"],
  ["beta", "beta (DPO)", ["dpo"], "any"],
  ["compute_multiplier", "completions a prompt, x 8", ["reinforcement"], "any"],
];
const GRADER = {type: "string_check", name: "correct", input: "{{ sample.output_text }}", reference: "{{ item.answer }}", operation: "ilike"};

async function newJobView() {
  const answer = await getJSON("/api/models");
  if (!answer.jobs) {
    main.innerHTML = `<h1>New fine-tuning job</h1><p class="muted">This server keeps no fine-tuning jobs: start it with
      <code>tunelab serve MODEL --data-dir DIR</code> (docs: fine-tuning-api.md).</p>`;
    return;
  }
  const models = answer.models.filter((m) => m.trainable).map((m) => m.id);
  const accept = ".jsonl,.json,.jsonl.gz,.json.gz,.csv,.tsv,.parquet";
  main.innerHTML = `<h1>New fine-tuning job</h1>
    <p class="muted">The files are uploaded and checked here as the job would check them when it starts: a file with a
      problem is shown by line, and nothing is submitted until both files are clean.</p>
    <form id="job-form" class="job-form">
      <fieldset><legend>Data</legend>
        <label>training file <input type="file" id="training_file" accept="${accept}"></label>
        <label>validation file <span class="muted">(optional)</span> <input type="file" id="validation_file" accept="${accept}"></label>
        <div id="check"><p class="muted">Choose a JSONL file: chats (<code>messages</code>), instructions; for DPO preference pairs;
          for reinforcement <code>messages</code> ending with the user's turn and the fields the grader reads.</p></div>
      </fieldset>
      <fieldset><legend>Model and method</legend>
        <label>base model <select id="model">${models.map((m) => `<option>${esc(m)}</option>`).join("")}</select></label>
        ${models.length ? "" : `<p class="error">No served model can be fine-tuned here: start the server with a causal LM.</p>`}
        <label>method <select id="method"><option value="supervised">supervised (SFT)</option><option value="dpo">DPO (preference pairs)</option>
          <option value="reinforcement">reinforcement (a grader)</option></select></label>
        <label>tuning <select id="tuning_mode"><option value="lora">LoRA</option><option value="full">full</option></select></label>
        <label id="rank-field">LoRA rank <input type="number" id="lora_rank" min="1" max="1024" placeholder="16"></label>
        <div id="grader-field" style="display: none"><label>grader <span class="muted">(OpenAI's grader object, JSON;
          its templates read <code>{{ sample.output_text }}</code> and the row's fields, <code>{{ item.answer }}</code>)</span>
          <textarea id="grader" rows="5" cols="90" spellcheck="false">${esc(JSON.stringify(GRADER, null, 1))}</textarea></label>
          <p id="grader-check" class="muted"></p></div>
      </fieldset>
      <fieldset><legend>Hyperparameters</legend>
        ${HYPERPARAMETERS.map(([key, label, , step]) => `<label data-for="${key}">${label}
          <input type="number" id="${key}" min="0" step="${step}" placeholder="auto"></label>`).join("")}
        <p class="muted" id="auto-note">Left empty, each takes its <code>auto</code> value, shown once the training file is checked.</p>
      </fieldset>
      <fieldset><legend>Name and tracking</legend>
        <label>suffix <input id="suffix" maxlength="64" pattern="[A-Za-z0-9._\\-]{1,64}" placeholder="e.g. support-bot"></label>
        <label>W&amp;B project <span class="muted">(optional)</span> <input id="wandb_project" maxlength="128" placeholder="log the run to W&amp;B"></label>
        <p class="muted">The model is served as <code>ft:MODEL:tunelab:SUFFIX:ID</code>. With a W&amp;B project the run is
          logged there too, with the server's own W&amp;B settings (OpenAI's W&amp;B integration).</p>
      </fieldset>
      <div class="toolbar"><button type="submit" id="submit" disabled>Create job</button><span class="error" id="submit-error"></span></div>
    </form>`;
  const files = {training_file: null, validation_file: null};  // the uploaded file objects
  const byId = (id) => document.getElementById(id);
  const submit = byId("submit"), checkBox = byId("check");
  let checked = null;  // the server's check of the current files, for the current method

  const showFields = () => {
    const method = byId("method").value;
    HYPERPARAMETERS.forEach(([key, , methods]) => { document.querySelector(`[data-for="${key}"]`).style.display = methods.includes(method) ? "" : "none"; });
    byId("rank-field").style.display = byId("tuning_mode").value === "lora" ? "" : "none";
    byId("grader-field").style.display = method === "reinforcement" ? "" : "none";
  };
  let grader = null;  // the reinforcement grader, as the server checked it
  const checkGrader = async () => {
    grader = null;
    const box = byId("grader-check");
    let given;
    try { given = JSON.parse(byId("grader").value); } catch (e) { box.className = "error"; box.textContent = `not JSON: ${e.message}`; return; }
    const response = await authedFetch("/v1/fine_tuning/alpha/graders/validate", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify({grader: given})});
    if (!response.ok) { box.className = "error"; box.textContent = await errorOf(response); return; }
    grader = (await response.json()).grader;
    box.className = "ok";
    box.textContent = `grader ${grader.name} (${grader.type}): checked`;
  };
  const showAuto = () => {
    HYPERPARAMETERS.forEach(([key]) => { byId(key).placeholder = checked && checked.ok && key in checked.auto ? `auto (${checked.auto[key]})` : "auto"; });
    if (!checked || !checked.ok) return;
    const mode = byId("tuning_mode").value, multiplier = Number(byId("learning_rate_multiplier").value) || checked.auto.learning_rate_multiplier;
    const epochs = Number(byId("n_epochs").value) || checked.auto.n_epochs, examples = checked.examples.training_file;
    byId("auto-note").innerHTML = `Learning rate ${(checked.learning_rate[mode] * multiplier).toExponential(1)}
      (${checked.learning_rate[mode].toExponential(0)} for ${mode === "lora" ? "LoRA" : "full fine-tuning"} × the multiplier);
      ${fmt(epochs * examples)} examples seen (${epochs} epoch${epochs > 1 ? "s" : ""} of ${fmt(examples)}; short ones are packed together, so there are fewer steps).`;
  };
  const problemRows = (problems) => problems.map((p) => `<tr><td>${p.param === "validation_file" ? "validation" : "training"}
    ${esc(files[p.param] ? files[p.param].filename : "")}</td><td class="num">${p.line ?? ""}</td><td>${esc(p.message)}</td></tr>`).join("");

  const check = async () => {
    checked = null;
    submit.disabled = true;
    if (!files.training_file) { showAuto(); return; }
    checkBox.innerHTML = `<p class="muted">Checking…</p>`;
    const query = new URLSearchParams({method: byId("method").value, training_file: files.training_file.id});
    if (files.validation_file) query.set("validation_file", files.validation_file.id);
    const response = await authedFetch(`/api/fine_tuning/check?${query}`);
    if (!response.ok) { checkBox.innerHTML = `<p class="error">${esc(await errorOf(response))}</p>`; return; }
    checked = await response.json();
    const examples = Object.entries(checked.examples).map(([param, n]) => `${fmt(n)} ${param === "training_file" ? "training" : "validation"} examples`).join(", ");
    if (!checked.ok) {
      // nothing is submitted, and the files with problems go from the server again: fixed, they are chosen anew
      const bad = [...new Set(checked.errors.map((p) => p.param))];
      checkBox.innerHTML = `<p class="error" id="check-summary">${checked.error_count} problem${checked.error_count > 1 ? "s" : ""}
        in ${bad.map((param) => esc(files[param].filename)).join(" and ")}: fix ${checked.error_count > 1 ? "them" : "it"} and choose the file again.
        Nothing was submitted.</p>
        <table id="problems"><thead><tr><th>file</th><th class="num">line</th><th>problem</th></tr></thead><tbody>${problemRows(checked.errors)}</tbody></table>`;
      for (const param of bad) {
        authedFetch(`/v1/files/${encodeURIComponent(files[param].id)}`, {method: "DELETE"}).catch(() => {});
        files[param] = null;
        byId(param).value = "";
      }
    } else {
      checkBox.innerHTML = `<p class="ok" id="check-summary">Ready: ${examples}.</p>${checked.warnings.length ? `<details><summary>${checked.warning_count}
        warning${checked.warning_count > 1 ? "s" : ""} (worth a look; they do not stop the job)</summary><table id="warnings"><tbody>${problemRows(checked.warnings)}</tbody></table></details>` : ""}`;
      submit.disabled = !models.length;
    }
    showAuto();
  };

  const upload = async (param) => {
    const input = byId(param);
    if (files[param]) authedFetch(`/v1/files/${encodeURIComponent(files[param].id)}`, {method: "DELETE"}).catch(() => {});
    files[param] = null;
    if (!input.files.length) return check();
    checkBox.innerHTML = `<p class="muted">Uploading ${esc(input.files[0].name)}…</p>`;
    submit.disabled = true;
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", input.files[0]);
    const response = await authedFetch("/v1/files", {method: "POST", body: form});
    if (!response.ok) { checkBox.innerHTML = `<p class="error">${esc(input.files[0].name)}: ${esc(await errorOf(response))}</p>`; return; }
    files[param] = await response.json();
    await check();
  };
  const failed = (e) => { if (e instanceof KeyNeeded) keyView(e.message); else checkBox.innerHTML = `<p class="error">${esc(e.message)}</p>`; };
  for (const param of ["training_file", "validation_file"]) byId(param).addEventListener("change", () => upload(param).catch(failed));
  byId("method").addEventListener("change", () => { showFields(); check().catch(failed); if (byId("method").value === "reinforcement") checkGrader().catch(failed); });
  byId("grader").addEventListener("change", () => checkGrader().catch(failed));
  byId("tuning_mode").addEventListener("change", () => { showFields(); showAuto(); });
  for (const key of ["learning_rate_multiplier", "n_epochs"]) byId(key).addEventListener("input", showAuto);
  showFields();

  byId("job-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!checked || !checked.ok) return;
    const method = byId("method").value, hyperparameters = {};
    for (const [key, , methods] of HYPERPARAMETERS) {
      const value = byId(key).value.trim();
      if (value !== "" && methods.includes(method)) hyperparameters[key] = Number(value);
    }
    hyperparameters.tuning_mode = byId("tuning_mode").value;
    if (hyperparameters.tuning_mode === "lora" && byId("lora_rank").value.trim()) hyperparameters.lora_rank = Number(byId("lora_rank").value);
    if (method === "reinforcement") {
      await checkGrader();
      if (!grader) { submit.disabled = false; return; }
    }
    const body = {model: byId("model").value, training_file: files.training_file.id,
      method: {type: method, [method]: method === "reinforcement" ? {grader, hyperparameters} : {hyperparameters}}};
    if (files.validation_file) body.validation_file = files.validation_file.id;
    if (byId("suffix").value.trim()) body.suffix = byId("suffix").value.trim();
    if (byId("wandb_project").value.trim()) body.integrations = [{type: "wandb", wandb: {project: byId("wandb_project").value.trim()}}];
    submit.disabled = true;
    try {
      const response = await authedFetch("/v1/fine_tuning/jobs", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
      if (!response.ok) { byId("submit-error").textContent = await errorOf(response); submit.disabled = false; return; }
      const job = await response.json();
      location.hash = runLink(job.id);  // its page follows it live
    } catch (e) { failed(e); submit.disabled = false; }
  });
}

// --- playground -------------------------------------------------------------------------------------

async function playgroundView(chosen, base) {
  // `chosen`: a fine-tuned model to try (a job's, linked from its page) beside `base`, the model it was tuned from
  const models = (await getJSON("/api/models")).models.filter((m) => m.generates).map((m) => m.id);
  if (chosen && !models.includes(chosen)) models.push(chosen);  // just finished: the next scan lists it
  const pick = (id, chosen) => `<select id="${id}">${models.map((m) => `<option ${m === chosen ? "selected" : ""}>${esc(m)}</option>`).join("")}</select>`;
  main.innerHTML = `<h1>Playground</h1>
    <p class="muted">One prompt to two models at once, streamed: a base model and its tuned run side by side.</p>
    <div class="toolbar"><label>max tokens <input id="max-tokens" type="number" value="128" min="1" style="width: 80px"></label>
      <label>temperature <input id="temperature" type="number" value="0" min="0" step="0.1" style="width: 70px"></label></div>
    <textarea id="prompt" rows="4" style="width: 100%">Give three tips for staying healthy.</textarea>
    <div class="toolbar" style="margin-top: 8px"><button id="send">Send</button></div>
    <div class="two"><div>${pick("model-a", chosen ? base || models[0] : models[0])}<div class="answer" id="answer-a"></div></div>
      <div>${pick("model-b", chosen || models[1] || models[0])}<div class="answer" id="answer-b"></div></div></div>`;
  const send = document.getElementById("send");
  send.addEventListener("click", async () => {
    send.disabled = true;
    const prompt = document.getElementById("prompt").value;
    await Promise.all([["model-a", "answer-a"], ["model-b", "answer-b"]].map(([select, out]) =>
      stream(document.getElementById(select).value, prompt, document.getElementById(out))));
    send.disabled = false;
  });
}

async function stream(model, prompt, out) {
  // POST /v1/chat/completions with stream: true, its server-sent events read as they arrive
  out.textContent = "";
  out.dataset.done = "false";
  try {
    const response = await authedFetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({
      model, stream: true, max_tokens: Number(document.getElementById("max-tokens").value) || 128,
      temperature: Number(document.getElementById("temperature").value) || 0,
      messages: [{role: "user", content: prompt}]})});
    if (!response.ok) throw new Error(await errorOf(response));
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut).replace(/^data: /, "");
        buffer = buffer.slice(cut + 2);
        if (event === "[DONE]") continue;
        const chunk = JSON.parse(event);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          out.textContent += delta.content;
          out.dataset.chunks = String(Number(out.dataset.chunks || 0) + 1);
        }
      }
    }
  } catch (e) {
    if (e instanceof KeyNeeded) return keyView(e.message);
    out.innerHTML = `<span class="error">${esc(e.message)}</span>`;
  }
  out.dataset.done = "true";
}
