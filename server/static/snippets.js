// "Copy as code": the current inputs as ready-to-run code for each API this server speaks, with this
// server's base URL and key. The request shapes are the contracts' own (docs/clients.md, docs/fal.md).
"use strict";
import { $, el } from "./api.js";
import { bodyJSON } from "./form.js";

const TABS = [
  ["curl", "curl (fal queue)"], ["fal-js", "fal JS"], ["fal-py", "fal Python"],
  ["openai", "OpenAI SDK"], ["aimlapi", "AI/ML API"], ["onerouter", "OneRouter"],
];
let active = "curl";

// Python literal of a JSON value (true -> True ...); strings keep JSON's escapes, which Python reads.
function py(value, pad = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "object") {
    const inner = pad + "    ";
    const items = Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${k === "seed" ? v : py(v, inner)},`);
    return items.length ? `{\n${items.join("\n")}\n${pad}}` : "{}";
  }
  return typeof value === "string" ? JSON.stringify(value) : String(value);
}

// What the other APIs need to say the same thing: the variant, its size and clip length.
function derive(model, body, table) {
  const secs = body.duration ? parseInt(body.duration, 10) : Object.values(model.variants)[0].seconds;
  const variant = model.variants[String(secs)] || Object.values(model.variants)[0];
  let size = null;
  if (/^\d+x\d+$/.test(body.resolution || "")) size = body.resolution;
  else if (body.aspect_ratio) size = table.aspect_sizes[body.resolution === "1024P" ? "1024P" : "512P"][body.aspect_ratio];
  else if (model.task === "t2v") size = variant.default_size;
  const aspect = Object.keys(table.aspect_sizes["512P"]).find((a) => table.aspect_sizes["512P"][a] === size) || null;
  return { variant, secs, size, aspect, tiny: variant.family === "tiny" };
}

function withoutImage(body) { const b = { ...body }; delete b.image_url; return b; }

function curl(ctx) {
  const { base, model, body } = ctx;
  const i2v = body.image_url !== undefined;
  const json = bodyJSON(i2v ? { ...body, image_url: "IMAGE" } : body, 2);
  const send = i2v
    ? `  -d "$(sed "s|\\"IMAGE\\"|\\"data:image/png;base64,$(base64 -w0 image.png)\\"|" <<'EOF'\n${json}\nEOF\n)")`
    : `  -d @- <<'EOF'\n${json}\nEOF\n)`;
  return `# fal's queue API: submit, wait, download (bash + curl; ${i2v ? "image.png is your image" : "no other tools"})
BASE=${base}
AUTH="Authorization: Key ${ctx.key}"
JOB=$(curl -sS -X POST "$BASE/${model.id}" -H "$AUTH" -H "Content-Type: application/json" \\
${send}
URL=$(printf '%s' "$JOB" | sed -n 's/.*"response_url": *"\\([^"]*\\)".*/\\1/p')
[ -n "$URL" ] || { echo "$JOB"; exit 1; }
until curl -sS "$URL/status" -H "$AUTH" | grep -q '"status": *"COMPLETED"'; do sleep 1; done
RESULT=$(curl -sS "$URL" -H "$AUTH")
VIDEO=$(printf '%s' "$RESULT" | sed -n 's/.*"url": *"\\([^"]*\\)".*/\\1/p')
[ -n "$VIDEO" ] || { echo "$RESULT"; exit 1; }
curl -sS -o k5serve.mp4 "$VIDEO" && echo "saved k5serve.mp4 from $VIDEO"`;
}

function falJs({ base, key, model, body }) {
  const i2v = body.image_url !== undefined;
  const args = bodyJSON(i2v ? { ...body, image_url: "IMAGE" } : body, 4).replace(/\n}$/, "\n  }");
  return `// npm install @fal-ai/client   (node 18+; save as run.mjs)
import { fal } from "@fal-ai/client";${i2v ? '\nimport { readFileSync } from "node:fs";' : ""}

fal.config({
  credentials: ${JSON.stringify(key)},
  proxyUrl: { url: ${JSON.stringify(base + "/api/fal/proxy")}, when: "always" },
});
const result = await fal.subscribe(${JSON.stringify(model.id)}, {
  input: ${i2v ? args.replace('"IMAGE"', '"data:image/png;base64," + readFileSync("image.png").toString("base64")') : args},
  logs: true,
  onQueueUpdate: (update) => console.log(update.status, (update.logs || []).map((l) => l.message).at(-1) || ""),
});
console.log(result.data.video.url);`;
}

function falPy({ base, key, model, body }) {
  const host = base.replace(/^https?:\/\//, "");
  const i2v = body.image_url !== undefined;
  const args = py(i2v ? { ...body, image_url: "IMAGE" } : body).replace('"IMAGE"', 'fal_client.encode_file("image.png")');
  const tls = base.startsWith("https:") ? "" :
    "# fal_client speaks https only: start k5serve with --ssl-certfile/--ssl-keyfile (docs/fal.md) and use https here\n";
  return `# pip install fal-client
${tls}import os

os.environ["FAL_KEY"] = ${JSON.stringify(key)}
os.environ["FAL_QUEUE_RUN_HOST"] = ${JSON.stringify(host)}  # submit, status, result
os.environ["FAL_RUN_HOST"] = ${JSON.stringify(host)}  # fal_client.run() wants --fal-run-port's host:port
# os.environ["SSL_CERT_FILE"] = "cert.pem"  # a self-signed certificate

import fal_client

result = fal_client.subscribe(
    ${JSON.stringify(model.id)},
    arguments=${args.replace(/\n/g, "\n    ")},
    with_logs=True,
    on_queue_update=print,
)
print(result["video"]["url"])`;
}

function openai({ base, key, body, d, model }) {
  const extra = {};
  if (body.num_inference_steps !== undefined) extra.num_inference_steps = body.num_inference_steps;
  if (body.seed !== undefined) extra.seed = body.seed;
  if (body.negative_prompt) extra.negative_prompt = body.negative_prompt;
  const args = [`    model=${JSON.stringify(d.variant.name)},`, `    prompt=${JSON.stringify(body.prompt || "")},`];
  if (!d.tiny) args.push(`    seconds=${JSON.stringify(String(d.secs))},`);
  if (d.size) args.push(`    size=${JSON.stringify(d.size)},`);
  if (body.image_url !== undefined) args.push('    input_reference=open("image.png", "rb"),');
  if (Object.keys(extra).length) args.push(`    extra_body=${py(extra, "    ")},  # k5serve extensions`);
  const lost = ["guidance_scale", "acceleration", "enable_prompt_expansion"].filter((k) => body[k] !== undefined && k in body);
  return `# pip install openai
from openai import OpenAI

client = OpenAI(api_key=${JSON.stringify(key)}, base_url=${JSON.stringify(base + "/v1")})
${lost.length ? `# not on this API: ${lost.join(", ")} (the variant's defaults and the server's --expand-prompts apply)\n` : ""}video = client.videos.create_and_poll(
${args.join("\n")}
)
if video.status == "completed":
    client.videos.download_content(video.id).write_to_file("k5serve.mp4")
    print("saved k5serve.mp4", video.id)
else:
    print(video.status, video.error)
${model.runs ? "# demo mode: the server runs " + model.runs.variant + "; size/seconds in the answer say what was made\n" : ""}`;
}

function unsupported(name, ctx) {
  const { body, d } = ctx;
  if (body.image_url !== undefined) return `# ${name}'s Kandinsky 5 models are text-to-video only: use fal, curl or the OpenAI SDK for image to video.`;
  if (d.tiny || !d.aspect) return `# ${name} takes only the SD sizes 768x512, 512x512, 512x768: ${d.size} cannot be said here (pick a Lite or Pro 512P size).`;
  return null;
}

function aimlapi(ctx) {
  const { base, key, body, d } = ctx;
  const no = unsupported("AI/ML API", ctx);
  if (no) return no;
  const data = { model: d.variant.name, prompt: body.prompt || "", aspect_ratio: d.aspect, duration: d.secs };
  if (body.num_inference_steps !== undefined) data.num_inference_steps = body.num_inference_steps;
  if (body.seed !== undefined) data.seed = body.seed;
  if (body.negative_prompt) data.negative_prompt = body.negative_prompt;
  if (body.enable_prompt_expansion !== undefined) data.enhance_prompt = body.enable_prompt_expansion;
  return `# pip install requests   (AI/ML API's documented plain-HTTP flow)
import time

import requests

URL = ${JSON.stringify(base + "/v2/video/generations")}
HEADERS = {"Authorization": "Bearer ${key}"}
gen = requests.post(URL, json=${py(data)}, headers=HEADERS).json()
while True:
    job = requests.get(URL, params={"generation_id": gen["id"]}, headers=HEADERS).json()
    if job["status"] not in ("waiting", "active", "queued", "generating"):
        break
    time.sleep(1)
print(job["video"]["url"] if job["status"] == "completed" else job)`;
}

function onerouter(ctx) {
  const { base, key, body, d } = ctx;
  const no = unsupported("OneRouter", ctx);
  if (no) return no;
  const data = { model: d.variant.name, prompt: body.prompt || "", resolution: d.size, video_length: `${d.secs}s`, output_format: "url" };
  if (body.num_inference_steps !== undefined) data.num_inference_steps = body.num_inference_steps;
  if (body.seed !== undefined) data.seed = body.seed;
  if (body.negative_prompt) data.negative_prompt = body.negative_prompt;
  if (body.enable_prompt_expansion !== undefined) data.expand_prompt = body.enable_prompt_expansion;
  return `# OneRouter: one synchronous call (the answer comes when the video is made: use a long timeout)
curl -sS --max-time 3600 ${base}/v1/videos/generations \\
  -H "Authorization: Bearer ${key}" -H "Content-Type: application/json" \\
  -d @- <<'EOF'
${bodyJSON(data, 2)}
EOF`;
}

const MAKERS = { curl, "fal-js": falJs, "fal-py": falPy, openai, aimlapi, onerouter };

export function snippets(model, body, table, key) {
  const ctx = { base: location.origin, key, model, body: withoutImage(body), d: derive(model, body, table) };
  if (body.image_url !== undefined) ctx.body.image_url = "IMAGE";
  const out = {};
  for (const [name] of TABS) out[name] = MAKERS[name](ctx);
  return out;
}

export function renderSnippets(model, body, table, key) {
  $("base").textContent = location.origin;
  const code = snippets(model, body, table, key);
  for (const [name] of TABS) $("code-" + name).textContent = code[name];
}

function select(name) {
  active = name;
  for (const [n] of TABS) {
    $("tab-" + n).setAttribute("aria-selected", String(n === name));
    $("tab-" + n).tabIndex = n === name ? 0 : -1;
    $("panel-" + n).classList.toggle("hidden", n !== name);
  }
}

export function initSnippets() {
  const tabs = TABS.map(([name, label]) => el("button", { type: "button", role: "tab", id: "tab-" + name,
    "aria-controls": "panel-" + name, onclick: () => select(name) }, label));
  $("code-tabs").replaceChildren(...tabs);
  $("code-tabs").addEventListener("keydown", (e) => {  // arrow keys move between tabs
    const i = TABS.findIndex(([n]) => n === active), step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
    if (step) { const next = TABS[(i + step + TABS.length) % TABS.length][0]; select(next); $("tab-" + next).focus(); }
  });
  $("code-panels").replaceChildren(...TABS.map(([name, label]) => {
    const pre = el("pre", { id: "code-" + name, tabindex: "0", "aria-label": label + " code" });
    const copy = el("button", { type: "button", "aria-label": "Copy " + label + " code", onclick: async () => {
      try { await navigator.clipboard.writeText(pre.textContent); copy.textContent = "Copied"; }
      catch { getSelection().selectAllChildren(pre); copy.textContent = "Selected: press Ctrl+C"; }
      setTimeout(() => { copy.textContent = "Copy"; }, 1500);
    } }, "Copy");
    return el("div", { role: "tabpanel", id: "panel-" + name, "aria-labelledby": "tab-" + name },
      el("div", { class: "code-head" }, el("small", { class: "hint" }, label), copy), pre);
  }));
  select(active);
}
