// The create form, built from the server's model table (GET /api/models): one control per input the
// chosen model takes, with its default and range; checks before submit; re-run fills it from a job.
"use strict";
import { $, el } from "./api.js";

let table = null;           // GET /api/models
let image = null;           // data: URI of the chosen image (file, paste or drop)
let lastSeed = null;        // the seed the last job ran with ("Reuse")
const sentImages = new Map();  // job id -> the image this page sent with it (re-run reuses it)
let changed = () => {};

export function mode() { return document.querySelector("input[name=mode]:checked").value; }
export function model() { return table.models.find((m) => m.id === $("model").value); }
export function modelTable() { return table; }
export function rememberImage(jobId) { if (image && model().task === "i2v") sentImages.set(jobId, image); }
export function setLastSeed(seed) { lastSeed = seed; $("seed-reuse") && ($("seed-reuse").disabled = seed === null); }

function controlId(f) { return f.name === "prompt" ? "prompt" : f.name === "image_url" ? "image" : f.name === "seed" ? "seed" : "f-" + f.name; }

function hint(f) {
  const parts = [];
  if (f.kind === "seed") parts.push(`default random · ${f.min} to 2^63-1`);
  else if (f.kind === "int" || f.kind === "float") parts.push(`default ${f.default} · ${f.min} to ${f.max}`);
  else if (f.kind === "choice") parts.push(f.default !== null ? `default ${f.default}` : `default: ${f.unset || "the server's"}`);
  else if (f.kind === "bool") parts.push(`default ${f.default ? "on" : "off"}`);
  if (f.name === "acceleration" && f.noop_for && f.noop_for.length) parts.push(`no MagCache calibration for ${f.noop_for.join(", ")}: runs exactly`);
  if (f.help) parts.push(f.help);
  return parts.join(" · ");
}

function control(f) {
  const id = controlId(f);
  if (f.kind === "text") {
    const rows = f.name === "prompt" ? 3 : 2;
    return el("textarea", { id, rows, placeholder: f.placeholder || (f.name === "prompt" ? "a red fox running through snow" : ""), required: f.required });
  }
  if (f.kind === "bool") return el("input", { id, type: "checkbox", checked: !!f.default });
  if (f.kind === "choice") {
    const select = el("select", { id });
    if (f.default === null) select.append(el("option", { value: "" }, `(unset: ${f.unset || "server default"})`));
    for (const o of f.options) select.append(el("option", { value: o }, o));
    select.value = f.default === null ? "" : String(f.default);
    return select;
  }
  if (f.kind === "seed") return el("input", { id, type: "text", inputmode: "numeric", placeholder: "random", autocomplete: "off" });
  return el("input", { id, type: "number", min: f.min, max: f.max, step: f.kind === "float" ? f.step || "any" : 1, value: f.default });
}

function imageField(f) {
  const file = el("input", { id: "image", type: "file", accept: "image/*", onchange: () => file.files[0] && readImage(file.files[0]) });
  const preview = el("img", { id: "image-preview", alt: "the chosen image", class: image ? "" : "hidden" });
  if (image) preview.src = image;
  const zone = el("div", { class: "drop", id: "drop", tabindex: "0" }, "Drop an image here, or paste one (Ctrl+V)", preview);
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); } });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault(); zone.classList.remove("over");
    const dropped = [...e.dataTransfer.files].find((x) => x.type.startsWith("image/"));
    if (dropped) readImage(dropped);
  });
  return el("div", { class: "field", dataset: { field: f.name } },
    el("label", { for: "image" }, f.label), file, zone,
    el("small", { class: "hint" }, hint(f)), el("small", { class: "error", id: "err-" + f.name }));
}

function showImage(dataUri) {
  image = dataUri;
  const preview = $("image-preview");
  if (preview) { preview.src = image; preview.classList.remove("hidden"); }
  check(false); changed();
}

export function readImage(file) {
  const reader = new FileReader();
  reader.onload = () => showImage(reader.result);
  reader.readAsDataURL(file);
}

function seedField(f) {
  const input = control(f);
  const random = el("button", { type: "button", id: "seed-random", onclick: () => { input.value = ""; changed(); } }, "Random");
  const reuse = el("button", { type: "button", id: "seed-reuse", disabled: lastSeed === null,
    onclick: () => { input.value = String(lastSeed); check(false); changed(); } }, "Reuse last");
  return el("div", { class: "field", dataset: { field: f.name } },
    el("label", { for: "seed" }, f.label), el("div", { class: "inline" }, input, random, reuse),
    el("small", { class: "hint" }, hint(f)), el("small", { class: "error", id: "err-" + f.name }));
}

function field(f) {
  if (f.kind === "image") return imageField(f);
  if (f.kind === "seed") return seedField(f);
  const c = control(f);
  const label = el("label", { for: c.id }, f.label);
  if (f.kind === "bool") {
    return el("div", { class: "field", dataset: { field: f.name } },
      el("label", { for: c.id, class: "inline" }, c, f.label), el("small", { class: "hint" }, hint(f)),
      el("small", { class: "error", id: "err-" + f.name }));
  }
  return el("div", { class: "field", dataset: { field: f.name } }, label, c,
    el("small", { class: "hint" }, hint(f)), el("small", { class: "error", id: "err-" + f.name }));
}

function values() {
  const out = {};
  for (const f of model().fields) {
    const c = $(controlId(f));
    if (!c || f.kind === "image") continue;
    out[f.name] = f.kind === "bool" ? c.checked : c.value;
  }
  return out;
}

// The model's fields; values the new model also accepts are kept (prompt, seed, a valid size ...).
function render(keep) {
  const m = model();
  const box = $("fields");
  box.replaceChildren(...m.fields.map(field));
  for (const f of m.fields) {
    const c = $(controlId(f));
    if (!c || !(f.name in keep) || f.kind === "image") continue;
    if (f.kind === "bool") continue;  // a switch takes the new model's default
    if (f.kind === "choice" && !f.options.map(String).includes(keep[f.name])) continue;
    if ((f.kind === "int" || f.kind === "float") && keep.__model !== m.id) continue;  // defaults differ per model
    c.value = keep[f.name];
  }
  for (const c of box.querySelectorAll("input, select, textarea")) {
    c.addEventListener("input", () => { check(false); changed(); });
    c.addEventListener("change", () => { check(false); changed(); });
  }
  describeModel(m);
}

function describeModel(m) {
  const v = Object.values(m.variants);
  const parts = [`${m.task === "i2v" ? "image" : "text"} to video`];
  parts.push(v.map((x) => `${x.name}: ${x.sizes.join(", ")}, ${x.frames} frames @ ${x.fps} fps`).join("; "));
  const missing = v.filter((x) => !x.available && x.download);
  if (m.runs) parts.push(`demo mode: runs ${m.runs.variant} (random weights, at most ${m.runs.max_side} px and ${m.runs.max_frames} frames; the video is noise)`);
  else if (missing.length) parts.push("weights missing: " + missing.map((x) => x.download).join("; "));
  $("model-info").textContent = parts.join(" · ");
}

function fillModels() {
  const select = $("model"), keep = select.value, task = mode();
  const groups = [["fal endpoints", false], ["local variants (k5serve/…)", true]].map(([label, local]) =>
    el("optgroup", { label }, table.models.filter((m) => m.task === task && m.local === local).map((m) => el("option", { value: m.id }, m.label))));
  select.replaceChildren(...groups);
  const ids = table.models.filter((m) => m.task === task).map((m) => m.id);
  select.value = ids.includes(keep) ? keep : table.defaults[task];
}

function switchModel() {
  const keep = $("fields").childElementCount ? { ...values(), __model: $("fields").dataset.model } : {};
  render(keep);
  $("fields").dataset.model = $("model").value;
  changed();
}

export function initForm(modelTable, onChange) {
  table = modelTable; changed = onChange;
  for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", () => { fillModels(); switchModel(); });
  $("model").addEventListener("change", switchModel);
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData || {}).items || []].find((x) => x.type.startsWith("image/"));
    if (item && model().task === "i2v") { e.preventDefault(); readImage(item.getAsFile()); }
  });
  fillModels(); switchModel();
}

function problem(f, raw) {
  if (f.kind === "text" && f.required && !raw.trim()) return `${f.label} is required`;
  if (f.kind === "image") return f.required && !image ? `${model().id} makes video from an image: choose, paste or drop one` : "";
  if (f.kind === "seed") {
    if (raw.trim() === "") return "";
    if (!/^\d+$/.test(raw.trim())) return `Seed must be a whole number from 0 (or empty for random), got "${raw}"`;
    return BigInt(raw.trim()) > 9223372036854775807n ? "Seed must be at most 2^63-1" : "";
  }
  if (f.kind === "int" || f.kind === "float") {
    const n = Number(raw);
    if (raw.trim() === "" || !isFinite(n)) return `${f.label} must be a number from ${f.min} to ${f.max}`;
    if (f.kind === "int" && !Number.isInteger(n)) return `${f.label} must be a whole number, got ${raw}`;
    if (n < f.min || n > f.max) return `${f.label} must be from ${f.min} to ${f.max}, got ${raw}`;
  }
  return "";
}

// Marks each bad field and says why; with `all` also the empty required ones. True when all is well.
export function check(all = true) {
  let ok = true;
  const v = values();
  for (const f of model().fields) {
    const raw = f.kind === "image" ? "" : String(v[f.name] ?? "");
    let why = problem(f, raw);
    if (!all && (f.kind === "image" || (f.kind === "text" && f.required))) why = why && $("err-" + f.name).textContent ? why : "";
    const c = $(controlId(f));
    if (c) c.setAttribute("aria-invalid", why ? "true" : "false");
    if ($("err-" + f.name)) $("err-" + f.name).textContent = why;
    ok = ok && !problem(f, raw);
  }
  return ok;
}

// The fal body for the current inputs (what the page posts, and what "copy as code" starts from).
export function inputs() {
  const m = model(), v = values(), body = {};
  for (const f of m.fields) {
    if (f.kind === "image") { if (image) body.image_url = image; continue; }
    const raw = v[f.name];
    if (f.kind === "bool") body[f.name] = raw;
    else if (f.kind === "int" || f.kind === "float") body[f.name] = Number(raw);
    else if (f.kind === "seed") { if (String(raw).trim()) body.seed = String(raw).trim(); }
    else if (raw !== "" && raw !== undefined) body[f.name] = raw;
  }
  return { model: m, body };
}

// JSON text of a body; a seed goes out as the digits typed (past 2^53 a JS number would round it).
export function bodyJSON(body, indent) {
  if (body.seed === undefined) return JSON.stringify(body, null, indent);
  return JSON.stringify({ ...body, seed: "\u0000seed" }, null, indent).replace('"\\u0000seed"', body.seed);
}

// Re-run: the job's model (or its variant as k5serve/<name>) and the settings it ran with.
export function applyJob(job) {
  const req = job.request || {}, ran = job.resolved || {};
  const byId = table.models.find((m) => m.id === job.model);
  const m = byId || table.models.find((x) => x.id === "k5serve/" + (req.variant || ""));
  if (!m) return false;
  document.querySelector(`input[name=mode][value=${m.task}]`).checked = true;
  fillModels(); $("model").value = m.id; render({}); $("fields").dataset.model = m.id;
  const set = (name, value) => { const f = m.fields.find((x) => x.name === name); const c = f && $(controlId(f));
    if (c && value !== null && value !== undefined) { if (f.kind === "bool") c.checked = !!value; else c.value = String(value); } };
  set("prompt", req.prompt); set("negative_prompt", req.negative_prompt);
  set("num_inference_steps", req.steps ?? ran.steps); set("guidance_scale", req.guidance ?? ran.guidance);
  set("seed", ran.seed ?? req.seed); set("acceleration", req.acceleration); set("enable_prompt_expansion", req.expand_prompt);
  if (req.seconds) set("duration", req.seconds + "s");
  if (req.width && req.height) {
    const size = `${req.width}x${req.height}`;
    const res = m.fields.find((x) => x.name === "resolution");
    if (res && res.options.includes(size)) set("resolution", size);
    for (const [tier, sizes] of Object.entries(table.aspect_sizes)) {
      const aspect = Object.keys(sizes).find((a) => sizes[a] === size);
      if (aspect) { set("aspect_ratio", aspect); if (res && res.options.includes(tier)) set("resolution", tier); }
    }
  }
  if (m.task === "i2v" && sentImages.has(job.id)) showImage(sentImages.get(job.id));
  else if (m.task === "i2v" && req.image && !image) $("form-error").textContent = "Choose the image again: the server keeps no copy for re-runs.";
  describeModel(m); check(false); changed();
  return true;
}
