// Talking to this server: the key (browser-only), JSON calls, and the server's own error words.
"use strict";

export const $ = (id) => document.getElementById(id);
const KEY = "k5serve-key";

export function apiKey() { return localStorage.getItem(KEY) || ""; }
export function setApiKey(value) { localStorage.setItem(KEY, value.trim()); }

// fal's clients send "Key <key>"; every contract of k5serve accepts it.
export function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (apiKey()) h.Authorization = "Key " + apiKey();
  return h;
}

export class ServerError extends Error {
  constructor(status, message, body) { super(message); this.status = status; this.body = body; }
}

// The server's message, word for word, whatever the contract's error shape.
export function serverMessage(body, status) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((d) => {
      const where = (d.loc || []).filter((part) => part !== "body").join(".");
      return where ? `${where}: ${d.msg}` : d.msg;
    }).join("\n");
  }
  if (body && body.error && body.error.message) return body.error.message;
  if (body && body.message) return body.message;
  return body ? JSON.stringify(body) : "HTTP " + status;
}

export function explain(err) {
  if (err instanceof ServerError && err.status === 401) {
    return "401 Unauthorized: this server was started with --api-key. Enter one of its keys in \u201cAPI key\u201d " +
      "at the top (it stays in this browser's localStorage). The server said: " + err.message;
  }
  if (err instanceof ServerError) return `${err.status}: ${err.message}`;
  return String(err && err.message ? err.message : err);
}

export async function call(path, { method = "GET", body, raw } = {}) {
  const init = { method, headers: headers(body !== undefined || raw !== undefined) };
  if (raw !== undefined) init.body = raw;
  else if (body !== undefined) init.body = JSON.stringify(body);
  const res = await fetch(path, init);
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!res.ok) throw new ServerError(res.status, serverMessage(data, res.status), data);
  return data;
}

// el("button", {type: "button", onclick: f}, "text", child) -> element
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export function seconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "";
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  return Math.floor(s / 60) + " min " + String(Math.round(s % 60)).padStart(2, "0") + " s";
}
