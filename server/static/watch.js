// Watching one job: queue position, phase, elapsed time and an estimate of the time left, its log,
// Cancel; the video once it is there. Polls GET /api/jobs/{id} (any contract's job).
"use strict";
import { $, call, explain, seconds } from "./api.js";

let current = null;  // the job id being watched
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const BEFORE_STEPS = new Set(["loading", "encoding"]);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// What the job is doing now, in words: queued (position), loading/encoding, step i/N, decoding, writing.
export function phaseText(job) {
  if (job.status === "queued") {
    const pos = job.queue_position;
    return pos === null || pos === undefined ? "waiting" : pos === 0 ? "next in the queue" : `position ${pos + 1} in the queue`;
  }
  if (job.status !== "running") return "";
  if (job.phase === "decoding" && job.phase_progress) return `decoding ${job.phase_progress.join("/")}`;
  if (job.phase === "writing") return "writing the mp4";
  if (job.progress) return `step ${job.progress.join("/")}`;
  if (job.phase === "loading") return "loading model";
  if (job.phase === "encoding") return "encoding prompt";
  return "starting";  // started, the engine has not said more yet
}

// Seconds left: the steps' own pace (from their log times), then the decode's chunks at theirs.
function eta(job) {
  if (job.status !== "running") return null;
  const times = (re) => job.logs.filter((l) => re.test(l.message)).map((l) => [Number(re.exec(l.message)[1]), l.time]);
  const pace = (points) => points.length >= 2 ? (points.at(-1)[1] - points[0][1]) / (points.at(-1)[0] - points[0][0]) : null;
  const since = (points) => Date.now() / 1000 - points.at(-1)[1];
  if (job.phase === "denoising" && job.progress) {
    const steps = times(/^step (\d+)\//), per = pace(steps);
    return per === null ? null : Math.max(0, per * (job.progress[1] - job.progress[0]) - since(steps));
  }
  if (job.phase === "decoding" && job.phase_progress) {
    const chunks = times(/^decoding (\d+)\//), per = pace(chunks);
    return per === null ? null : Math.max(0, per * (job.phase_progress[1] - job.phase_progress[0]) - since(chunks));
  }
  return null;
}

function show(job) {
  $("jobid").textContent = job.id;
  $("status").textContent = job.status;
  const detail = job.status === "failed" || job.status === "canceled" ? job.error || "" : phaseText(job);
  $("detail").textContent = detail;
  $("detail").className = job.status === "failed" ? "error" : "";
  const p = $("progress");
  const early = !job.phase || BEFORE_STEPS.has(job.phase);  // nothing to measure yet: indeterminate
  if (job.status === "queued" || (job.status === "running" && early)) p.removeAttribute("value");
  else p.value = job.percent;
  const now = Date.now() / 1000, start = job.started_at || job.created_at;
  const end = job.completed_at || now;
  $("elapsed").textContent = job.status === "queued" ? `waiting ${seconds(now - job.created_at)}` : `elapsed ${seconds(end - start)}`;
  const left = eta(job);
  $("eta").textContent = left === null ? "" : `· about ${seconds(left)} left`;
  $("ran").textContent = ranText(job);
  $("logs").textContent = job.logs.map((l) => `${new Date(l.time * 1000).toLocaleTimeString()}  ${l.message}`).join("\n");
  $("cancel").classList.toggle("hidden", TERMINAL.has(job.status));
}

// What runs (ran): variant, size, frames, steps, guidance, seed; demo mode's stand-in says what was asked.
function ranText(job) {
  const r = job.resolved;
  if (!r) return job.model ? `${job.model} (via ${job.contract})` : "";
  const asked = r.nominal_size ? ` (asked ${r.nominal_size.join("x")}: demo mode runs it small)` : "";
  return `${job.model} via ${job.contract} · runs ${r.variant} at ${r.width}x${r.height}${asked}, ${r.num_frames} frames, ` +
    `${r.steps} steps, guidance ${r.guidance}, seed ${r.seed}, acceleration ${r.acceleration}`;
}

function showVideo(job) {
  const video = $("video");
  video.src = job.video_url;
  if (job.poster_url) video.poster = job.poster_url;
  video.classList.remove("hidden");
  video.play().catch(() => {});
  $("download").href = job.video_url;
  $("download").classList.remove("hidden");
}

export function reset(text) {
  current = null;
  for (const id of ["video", "download", "cancel"]) $(id).classList.add("hidden");
  $("video").removeAttribute("src");
  $("jobid").textContent = ""; $("logs").textContent = ""; $("ran").textContent = ""; $("elapsed").textContent = ""; $("eta").textContent = "";
  $("status").textContent = text; $("detail").textContent = ""; $("progress").value = 0;
}

export function fail(err) {
  $("status").textContent = "error";
  $("detail").textContent = explain(err);
  $("detail").className = "error";
}

// Follows `id` until it ends (or another job is watched); returns the last state seen.
export async function watch(id, onUpdate) {
  current = id;
  let job = null;
  while (current === id) {
    try { job = await call(`/api/jobs/${encodeURIComponent(id)}`); }
    catch (err) { fail(err); return null; }
    if (current !== id) break;
    show(job);
    onUpdate && onUpdate(job);
    if (TERMINAL.has(job.status)) { if (job.status === "succeeded") showVideo(job); break; }
    await sleep(250);
  }
  return job;
}

export function initWatch() {
  $("cancel").addEventListener("click", async () => {
    const id = current;
    if (!id) return;
    $("cancel").disabled = true;
    try { await call(`/api/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" }); }
    catch (err) { fail(err); }
    finally { $("cancel").disabled = false; }
  });
}
