// The real `openai` npm package (pinned in package.json), unmodified, against a live k5serve: Sora code
// with only the base URL changed. Usage: node openai_scenarios.js <out-dir>
// Env: K5SERVE_URL (https://localhost:port), NODE_EXTRA_CA_CERTS (the test CA), K5SERVE_TEST_IMAGE (a PNG).
// Writes the downloaded files into <out-dir> and prints one JSON line for tests/clients/test_openai_clients.py.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { default: OpenAI, toFile } = require("openai");

const out = process.argv[2];
const client = new OpenAI({ apiKey: "local-key", baseURL: `${process.env.K5SERVE_URL.replace(/\/$/, "")}/v1` });
const png = fs.readFileSync(process.env.K5SERVE_TEST_IMAGE);
const FAST = { num_inference_steps: 1 }; // extra body keys go out as multipart parts like the others

async function status(promise) {
  try {
    await promise;
    return 200;
  } catch (err) {
    return { status: err.status, param: err.param ?? null, code: err.code ?? null, message: err.message };
  }
}

async function finish(video) {
  while (video.status === "queued" || video.status === "in_progress") {
    await new Promise((resolve) => setTimeout(resolve, 100));
    video = await client.videos.retrieve(video.id);
  }
  return video;
}

async function main() {
  const result = { created: [], files: {} };
  // create: always multipart from this SDK; input_reference as {image_url} (bracket-encoded by the
  // SDK as input_reference[image_url]); Sora's names, sizes and seconds
  const dataUrl = `data:image/png;base64,${png.toString("base64")}`;
  const created = await client.videos.create({
    prompt: "waves on a pier",
    model: "sora-2-pro",
    size: "720x1280",
    seconds: "4", // one pass of Pro (5 s); longer Pro clips are chained extensions (issue 15)
    input_reference: { image_url: dataUrl },
    ...FAST,
  });
  result.created.push(await finish(created));

  // list, both orders, one per page: the SDK follows last_id itself
  result.desc = [];
  for await (const video of client.videos.list({ limit: 1 })) result.desc.push(video.id);
  result.asc = [];
  for await (const video of client.videos.list({ limit: 1, order: "asc" })) result.asc.push(video.id);

  // the three download variants of the first video
  const first = result.created[0].id;
  for (const variant of ["video", "thumbnail", "spritesheet"]) {
    const response = await client.videos.downloadContent(first, { variant });
    const file = path.join(out, variant);
    fs.writeFileSync(file, Buffer.from(await response.arrayBuffer()));
    result.files[variant] = { path: file, type: response.headers.get("content-type") };
  }

  // refusals: characters (both routes, and on create) and an unknown id; each a 4xx, never retried
  const clip = await toFile(fs.readFileSync(path.join(out, "video")), "mossy.mp4", { type: "video/mp4" });
  result.refused = {
    createCharacter: await status(client.videos.createCharacter({ name: "Mossy", video: clip })),
    getCharacter: await status(client.videos.getCharacter("char_123")),
    createWithCharacters: await status(client.videos.create({ prompt: "x", characters: [{ id: "char_123" }] })),
    retrieveUnknown: await status(client.videos.retrieve("video_unknown")),
  };

  const deleted = await client.videos.delete(first);
  result.deleted = deleted;
  result.afterDelete = await status(client.videos.retrieve(first));
  console.log(JSON.stringify(result));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
