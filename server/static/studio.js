// The studio's entry point: loads the config and the model table, wires the parts together.
//   form.js      the inputs of the chosen model (from GET /api/models), checks, re-run
//   watch.js     one job: phase, times, log, Cancel, the video
//   history.js   every job of this server: gallery / table, cancel, delete, re-run, paging
//   snippets.js  copy as code, for each API this server speaks
//   workers.js   /readyz: workers and what they hold
"use strict";
import { $, apiKey, call, explain, setApiKey, ServerError } from "./api.js";
import { applyJob, bodyJSON, check, initForm, inputs, modelTable, rememberImage, setLastSeed } from "./form.js";
import { fail, initWatch, reset, watch } from "./watch.js";
import { initHistory, refresh } from "./history.js";
import { initSnippets, renderSnippets } from "./snippets.js";
import { initWorkers } from "./workers.js";

let config = null;

function keyForCode() { return apiKey() || (config.api_keys ? "YOUR_API_KEY" : "local"); }

function updateCode() {
  const { model, body } = inputs();
  renderSnippets(model, body, modelTable(), keyForCode());
}

async function submit(event) {
  event.preventDefault();
  $("form-error").textContent = "";
  if (!check(true)) {
    $("form-error").textContent = "Fix the fields marked above first.";
    const bad = document.querySelector("#fields [aria-invalid=true]");
    if (bad) bad.focus();
    return;
  }
  const { model, body } = inputs();
  $("submit").disabled = true;
  reset("submitting");
  try {
    const sub = await call("/" + model.id, { method: "POST", raw: bodyJSON(body) });
    rememberImage(sub.request_id);
    refresh();
    const job = await watch(sub.request_id, () => {});
    if (job && job.resolved) setLastSeed(job.resolved.seed);
  } catch (err) {
    fail(err);
    if (err instanceof ServerError && err.status === 401) $("key").focus();
  } finally {
    $("submit").disabled = false;
    refresh();
  }
}

function rerun(job) {
  $("form-error").textContent = "";
  if (!applyJob(job)) { $("form-error").textContent = `model ${job.model} is not one the studio can submit`; return; }
  $("prompt").focus();
  window.scrollTo({ top: 0, behavior: "smooth" });
}

async function init() {
  config = await call("/api/config");
  const table = await call("/api/models");
  $("keybox").classList.toggle("hidden", !config.api_keys);
  $("key").value = apiKey();
  $("key").addEventListener("change", () => { setApiKey($("key").value); refresh(); updateCode(); });
  if (config.demo) {
    $("demo").textContent = "Demo mode: no weights on disk, so every model is served by a tiny random-weight model (noise, at most 256 px and 25 frames).";
    $("demo").classList.remove("hidden");
  }
  initSnippets();
  initForm(table, updateCode);
  initWatch();
  $("form").addEventListener("submit", submit);
  initHistory(rerun, (job) => { reset("loading"); watch(job.id); $("job").scrollIntoView({ behavior: "smooth" }); });
  initWorkers();
  updateCode();
  document.body.dataset.ready = "1";
}

init().catch((err) => { $("form-error").textContent = "the studio could not start: " + explain(err); });
