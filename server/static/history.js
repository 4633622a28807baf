// The queue and the history: every job of this server (any API), newest first, as a gallery of
// poster frames that play on hover or click, or as a table; cancel, delete, re-run, paging.
"use strict";
import { $, call, el, explain, seconds } from "./api.js";
import { phaseText } from "./watch.js";

const PAGE = 12;
let offset = 0, total = 0, timer = null, hooks = {};
const ACTIVE = new Set(["queued", "running"]);

function duration(job) {
  const parts = [];
  if (job.video_seconds !== null) parts.push(`${job.video_seconds.toFixed(1)} s video`);
  if (job.inference_time !== null) parts.push(`made in ${seconds(job.inference_time)}`);
  return parts.join(", ");
}

function statusText(job) {
  const doing = phaseText(job);
  return job.status + (doing ? ` (${doing})` : "");
}

async function act(method, job, verb) {
  try {
    await call(`/api/jobs/${encodeURIComponent(job.id)}${verb === "cancel" ? "/cancel" : ""}`, { method });
  } catch (err) { $("history-error").textContent = explain(err); }
  refresh();
}

function tools(job) {
  const label = (what) => `${what} job ${job.id}`;
  return [
    el("button", { type: "button", class: "open", "aria-label": label("Watch"), onclick: () => hooks.open(job) }, "Open"),
    ACTIVE.has(job.status) && el("button", { type: "button", class: "cancel", "aria-label": label("Cancel"), onclick: () => act("POST", job, "cancel") }, "Cancel"),
    job.request && el("button", { type: "button", class: "rerun", "aria-label": label("Re-run"), onclick: () => hooks.rerun(job) }, "Re-run"),
    job.video_url && el("a", { class: "button", href: job.video_url, download: "k5serve.mp4", "aria-label": label("Download") }, "Download"),
    el("button", { type: "button", class: "delete", "aria-label": label("Delete"), onclick: () => act("DELETE", job, "delete") }, "Delete"),
  ];
}

// A poster that becomes the video on hover, focus or click (and back on leave).
function media(job) {
  const box = el("div", { class: "media" });
  if (!job.video_url) {
    box.append(el("div", { class: "placeholder" }, job.status === "failed" || job.status === "canceled" ? job.error || job.status : statusText(job)));
    return box;
  }
  const img = el("img", { class: "poster", src: job.poster_url, alt: `poster frame: ${job.prompt}`, loading: "lazy" });
  const play = () => {
    if (box.querySelector("video")) return;
    const v = el("video", { src: job.video_url, muted: true, loop: true, playsInline: true, autoplay: true, poster: job.poster_url });
    v.muted = true; box.append(v); v.play().catch(() => {});
  };
  const stop = () => { const v = box.querySelector("video"); if (v) v.remove(); };
  const button = el("button", { type: "button", class: "play", "aria-label": `Play job ${job.id}`, onclick: play }, "\u25B6");
  button.style.cssText = "position:absolute;left:.4em;bottom:.4em;z-index:1";
  box.addEventListener("mouseenter", play); box.addEventListener("mouseleave", stop);
  box.addEventListener("focusin", play); box.addEventListener("focusout", stop);  // the keyboard's hover
  box.addEventListener("click", play);
  box.append(img, button);
  return box;
}

function tile(job) {
  return el("article", { class: "tile", dataset: { id: job.id, status: job.status } }, media(job),
    el("div", { class: "body" },
      el("div", {}, el("span", { class: `badge ${job.status}` }, statusText(job)), " ", el("small", {}, job.contract)),
      el("div", { class: "prompt", title: job.prompt }, job.prompt),
      el("small", { class: "hint" }, [job.model, job.size, duration(job)].filter(Boolean).join(" · ")),
      job.error && el("small", { class: "error" }, job.error),
      el("div", { class: "tools" }, tools(job))));
}

function row(job) {
  return el("tr", { dataset: { id: job.id } },
    el("td", {}, statusText(job)), el("td", {}, job.model), el("td", { class: "prompt" }, job.prompt),
    el("td", {}, duration(job)), el("td", {}, job.contract),
    el("td", {}, job.error ? el("div", { class: "error" }, job.error) : null, tools(job)));
}

// The element already shown for `job` when nothing about it changed: a video playing on hover keeps
// playing through the refreshes while other jobs run.
function reuse(box, tag, job, make) {
  const sign = [job.status, job.percent, job.phase, job.queue_position, job.error].join("|");
  const old = [...box.querySelectorAll(`${tag}[data-id]`)].find((n) => n.dataset.id === job.id);
  if (old && old.dataset.sign === sign) return old;
  const made = make(job);
  made.dataset.sign = sign;
  return made;
}

export async function refresh() {
  clearTimeout(timer);
  let data;
  try {
    data = await call(`/api/jobs?limit=${PAGE}&offset=${offset}`);
    $("history-error").textContent = "";
  } catch (err) {
    $("history-error").textContent = explain(err);
    $("gallery").replaceChildren(); $("jobs").replaceChildren();
    timer = setTimeout(refresh, 10000);
    return;
  }
  total = data.total;
  $("gallery").replaceChildren(...data.jobs.map((j) => reuse($("gallery"), "article", j, tile)));
  $("jobs").replaceChildren(...data.jobs.map((j) => reuse($("jobs"), "tr", j, row)));
  const last = Math.min(offset + PAGE, total);
  $("page-info").textContent = total ? `${offset + 1}-${last} of ${total}` : "no jobs yet";
  $("prev").disabled = offset === 0; $("next").disabled = last >= total;
  const busy = data.jobs.some((j) => ACTIVE.has(j.status));
  timer = setTimeout(refresh, busy ? 1500 : 8000);
}

export function initHistory(rerun, open) {
  hooks = { rerun, open };
  $("refresh").addEventListener("click", refresh);
  $("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); refresh(); });
  $("next").addEventListener("click", () => { offset += PAGE; refresh(); });
  $("view").addEventListener("change", () => {
    const table = $("view").value === "table";
    $("jobs-table").classList.toggle("hidden", !table); $("gallery").classList.toggle("hidden", table);
  });
  refresh();
}
