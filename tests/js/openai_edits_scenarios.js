// The real `openai` npm package, unmodified: edits and extensions of a finished video by id, with the
// SDK's own typed `video: { id }` (sent natively as the multipart part video[id]; Python needs extra_body).
// Usage: node openai_edits_scenarios.js <video id>. Env: K5SERVE_URL, NODE_EXTRA_CA_CERTS.
// Prints one JSON line for tests/contracts/test_openai_edits.py.
"use strict";

const { default: OpenAI } = require("openai");

const client = new OpenAI({ apiKey: "local-key", baseURL: `${process.env.K5SERVE_URL.replace(/\/$/, "")}/v1` });
const id = process.argv[2];
const FAST = { num_inference_steps: 2 };

async function finish(video) {
  while (video.status === "queued" || video.status === "in_progress") {
    await new Promise((resolve) => setTimeout(resolve, 100));
    video = await client.videos.retrieve(video.id);
  }
  return video;
}

async function main() {
  const edited = await client.videos.edit({ prompt: "make it snow harder", video: { id }, ...FAST });
  const extended = await client.videos.extend({ prompt: "the fox runs on", seconds: "1", video: { id }, ...FAST });
  console.log(JSON.stringify({ edited: await finish(edited), extended: await finish(extended) }));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
