// The real @fal-ai/client (npm, pinned in package.json) against a live k5serve.
// Usage: node scenarios.js <polling|streaming|run|upload> <proxy|middleware>
// Env: K5SERVE_URL (e.g. https://localhost:8443), FAL_KEY, NODE_EXTRA_CA_CERTS (the test CA),
// K5SERVE_TEST_IMAGE (a PNG, for upload).
// Prints one JSON line: {result, updates}. Driven by tests/test_fal_js_client.py.
"use strict";

const fs = require("node:fs");
const { fal } = require("@fal-ai/client");

const [mode, hook] = process.argv.slice(2);
const LOCAL = process.env.K5SERVE_URL.replace(/\/$/, "");

if (hook === "proxy") {
  // The fal proxy protocol: every call goes to one URL, the real target in x-fal-target-url.
  // `when: "always"` because the default ("browser") does nothing under node.
  fal.config({ credentials: process.env.FAL_KEY, proxyUrl: { url: `${LOCAL}/api/fal/proxy`, when: "always" } });
} else if (hook === "middleware") {
  // Rewrite fal's hard-coded hosts: queue.fal.run -> --port, fal.run -> --fal-run-port, and
  // rest.fal.ai (storage uploads) -> --port, exactly as docs/fal.md gives it.
  const RUN = (process.env.K5SERVE_RUN_URL || LOCAL).replace(/\/$/, "");
  fal.config({
    credentials: process.env.FAL_KEY,
    requestMiddleware: async (req) => ({
      ...req,
      url: req.url
        .replace("https://queue.fal.run", LOCAL)
        .replace("https://fal.run", RUN)
        .replace("https://rest.fal.ai", LOCAL),
    }),
  });
} else {
  throw new Error(`unknown hook ${hook}`);
}

// fal.storage.upload of a Blob, then a Blob passed as image_url (the client uploads it itself)
// for image-to-video. Both uploads must land on this server: the sandbox reaches no fal host.
async function upload() {
  const png = fs.readFileSync(process.env.K5SERVE_TEST_IMAGE);
  const url = await fal.storage.upload(new Blob([png], { type: "image/png" }));
  const back = Buffer.from(await (await fetch(url)).arrayBuffer());
  const result = await fal.subscribe("fal-ai/kandinsky5-pro/image-to-video", {
    input: { prompt: `an upload ${hook} test`, image_url: new Blob([png], { type: "image/png" }), num_inference_steps: 2 },
    pollInterval: 200,
  });
  console.log(JSON.stringify({ uploadUrl: url, sameBytes: back.equals(png), result }));
}

async function main() {
  if (mode === "upload") {
    await upload();
    return;
  }
  const updates = [];
  const options = {
    input: { prompt: `a ${mode} ${hook} test`, num_inference_steps: 2 },
    logs: true,
    onQueueUpdate: (update) =>
      updates.push({
        status: update.status,
        logs: (update.logs || []).map((l) => l.message),
        times: (update.logs || []).map((l) => Date.parse(l.timestamp)), // as JS reads them (TZ is set)
      }),
  };
  if (mode === "run") {  // the synchronous run host (fal.run -> --fal-run-port)
    const result = await fal.run("fal-ai/kandinsky5/text-to-video", { input: options.input });
    console.log(JSON.stringify({ result, updates: [] }));
    return;
  }
  if (mode === "streaming") {
    options.mode = "streaming";
  } else {
    options.pollInterval = 200;
  }
  const result = await fal.subscribe("fal-ai/kandinsky5/text-to-video", options);
  console.log(JSON.stringify({ result, updates }));
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : err, err && err.body ? JSON.stringify(err.body) : "");
  process.exit(1);
});
