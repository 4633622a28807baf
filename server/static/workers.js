// Workers and models at a glance, from /readyz: the server's state, and per worker (when the server
// lists them) its devices, what it runs now, what it holds in memory and how many jobs it has done.
"use strict";
import { $, el } from "./api.js";

const KNOWN = new Set(["id", "devices", "pid", "node", "state", "job", "variants", "resident", "counters", "memory_in_use"]);

function bytes(n) {
  if (n === null || n === undefined) return "not measured";
  const gib = n / 2 ** 30;
  return gib >= 1 ? gib.toFixed(1) + " GiB" : (n / 2 ** 20).toFixed(0) + " MiB";
}

function kv(pairs) {
  return el("dl", { class: "kv" }, pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function worker(w) {
  const resident = w.resident || [];
  const held = resident.reduce((sum, r) => sum + (r.bytes || 0), 0);
  const pairs = [
    ["state", w.state], ["devices", (w.devices || []).join(" + ")], ["running", w.job || "idle"],
    ["loaded", (w.variants || []).join(", ") || "nothing yet"],
    ["resident", resident.length ? resident.map((r) => `${r.component} ${bytes(r.bytes)}`).join(", ") : null],
    ["memory", w.memory_in_use !== undefined ? bytes(w.memory_in_use) : held ? bytes(held) : null],
    ["pid", w.pid], ["node", w.node],
  ];
  for (const [k, v] of Object.entries(w.counters || {})) pairs.push([k.replace(/_/g, " "), String(v)]);
  for (const [k, v] of Object.entries(w)) {  // what a newer server adds (jobs done, ...), shown as it comes
    if (!KNOWN.has(k) && (typeof v !== "object" || v === null)) pairs.push([k.replace(/_/g, " "), String(v)]);
  }
  return el("article", { class: "worker", dataset: { worker: w.id } }, el("h3", {}, `worker ${w.id}`), kv(pairs));
}

export async function refreshWorkers() {
  let body;
  try {
    const res = await fetch("/readyz");
    body = await res.json();  // 503 while warming up still says why
  } catch (err) {
    $("workers").replaceChildren(el("p", { class: "error" }, "/readyz did not answer: " + err));
    return;
  }
  const summary = kv([
    ["server", body.status + (body.detail ? ` (${body.detail})` : "")], ["device", body.device],
    ["mode", body.demo ? "demo: tiny random-weight models" : "real weights"],
    ["queued", String(body.queued)], ["models it can run", (body.models || []).length + " variants"],
    ["last failure", body.last_error ? `${body.last_error.job_id}: ${body.last_error.message}` : null],
  ]);
  const cards = Array.isArray(body.workers) ? body.workers.map(worker)
    : [el("p", { class: "hint" }, "This server does not list its workers: it runs one, on " + body.device + ".")];
  $("workers").replaceChildren(summary, el("div", { class: "workers" }, cards));
}

export function initWorkers() {
  refreshWorkers();
  setInterval(refreshWorkers, 5000);
}
