// The bgtask dashboard: one snapshot per second over Server-Sent Events (/api/events), drawn
// into the tables. No framework, no build step.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;
const $ = (id) => document.getElementById(id);

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function ago(ms) {
  if (ms < 1000) return `${ms} ms ago`;
  return `${(ms / 1000).toFixed(1)} s ago`;
}

function span(ms) {
  if (ms == null) return "–";
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 120) return `${s.toFixed(1)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

// A sparkline of tasks/s: one point per bucket, oldest first.
function sparkline(points) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  const w = 120, h = 24;
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  const max = Math.max(1, ...points);
  const step = points.length > 1 ? w / (points.length - 1) : w;
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.map((p, i) => `${(i * step).toFixed(1)},${(h - 2 - (p / max) * (h - 4)).toFixed(1)}`).join(" "));
  svg.appendChild(line);
  return svg;
}

function fill(table, rows, emptyId) {
  const body = $(table).querySelector("tbody");
  body.replaceChildren(...rows);
  if (emptyId) $(emptyId).hidden = rows.length > 0;
}

function drawWorkers(workers) {
  $("workers-count").textContent = workers.length;
  fill("workers", workers.map((w) => {
    const tr = document.createElement("tr");
    tr.dataset.worker = w.id;
    const names = w.tasks.concat(w.targets.map((t) => `@${t}`)).join(", ");
    tr.append(
      cell(w.id.slice(0, 8)), cell(w.host), cell(w.pid, "num"), cell(names),
      cell(w.concurrency == null ? "–" : w.concurrency, "num"), cell(w.in_flight, "num"),
      cell(ago(w.last_seen_ms)),
    );
    return tr;
  }), "workers-empty");
}

function drawTasks(tasks) {
  fill("tasks", tasks.map((t) => {
    const tr = document.createElement("tr");
    tr.dataset.task = t.task;
    const rate = cell("");
    rate.append(sparkline(t.history), ` ${t.per_second.toFixed(1)}`);
    const done = cell(t.completed.success, "num done");
    tr.append(
      cell(t.task), cell(t.workers, "num"), cell(t.in_flight, "num in-flight"), rate, done,
      cell(t.completed.error, "num" + (t.completed.error ? " error-count" : "")),
      cell(t.completed.failed, "num" + (t.completed.failed ? " error-count" : "")),
      cell(span(t.p50_ms), "num"), cell(span(t.p99_ms), "num"),
    );
    return tr;
  }));
}

function drawKeys(keys) {
  $("keys-count").textContent = keys.keys.length + (keys.more ? "+" : "");
  fill("keys", keys.keys.map((k) => {
    const tr = document.createElement("tr");
    tr.dataset.key = `${k.task}/${k.value}`;
    tr.append(cell(k.task), cell(k.value), cell(k.in_flight, "num"));
    return tr;
  }), "keys-empty");
}

async function lift(task, value, button) {
  button.disabled = true;
  $("write-error").hidden = true;
  try {
    const response = await fetch("/api/blacklist/lift", {
      method: "POST",
      headers: { "content-type": "application/json", "x-csrf-token": csrf },
      body: JSON.stringify({ task, value }),
    });
    if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
  } catch (error) {
    $("write-error").textContent = `could not lift ${task}/${value}: ${error.message}`;
    $("write-error").hidden = false;
    button.disabled = false;
  }
}

function drawBlacklist(entries, writes) {
  $("blacklist-count").textContent = entries.length;
  fill("blacklist", entries.map((e) => {
    const tr = document.createElement("tr");
    tr.dataset.blacklisted = `${e.task}/${e.value}`;
    const action = cell("");
    if (writes) {
      const button = document.createElement("button");
      button.textContent = "lift";
      button.dataset.lift = `${e.task}/${e.value}`;
      button.addEventListener("click", () => lift(e.task, e.value, button));
      action.append(button);
    }
    tr.append(cell(e.task), cell(e.value), cell(e.reason), cell(span(e.remaining_ms)), action);
    return tr;
  }), "blacklist-empty");
}

function draw(snapshot) {
  $("where").textContent = `namespace ${snapshot.overview.namespace} on ${snapshot.overview.broker}`;
  drawWorkers(snapshot.workers);
  drawTasks(snapshot.tasks);
  drawKeys(snapshot.keys);
  drawBlacklist(snapshot.blacklist, snapshot.overview.writes);
  document.body.dataset.updated = snapshot.overview.updated_ms;
}

const events = new EventSource("/api/events");
events.addEventListener("snapshot", (event) => {
  $("status").textContent = "live";
  $("status").classList.add("live");
  draw(JSON.parse(event.data));
});
events.addEventListener("error", () => {
  $("status").textContent = "reconnecting";
  $("status").classList.remove("live");
});
