// The live status page: the pools from /status/, kept current by /events/.
// No framework, no external asset: the server's Content-Security-Policy
// allows scripts, styles and connections to this origin only.
"use strict";

const MAX_EVENTS = 50;           // recent events shown
const REFRESH_DELAY_MS = 150;    // events of one burst refresh their pools together
const pools = new Map();         // name -> pool as /status/ gives it, with "fetched" (ms)
const dirty = new Set();         // pools to fetch again
let refreshTimer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  seconds = Math.max(0, seconds);
  if (seconds < 60) return seconds.toFixed(1) + "s";
  const m = Math.floor(seconds / 60), s = Math.floor(seconds % 60);
  if (m < 60) return m + "m" + String(s).padStart(2, "0") + "s";
  return Math.floor(m / 60) + "h" + String(m % 60).padStart(2, "0") + "m";
}

function statusUrl(names) {
  const q = new URLSearchParams({format: "json"});
  for (const n of names || []) q.append("pool", n);
  return "/status/?" + q.toString();
}

// With access control on, the server wants "Authorization: Bearer SECRET";
// the secret is asked for once and kept for this tab only.
function headers(extra) {
  const secret = sessionStorage.getItem("distributex-secret");
  return Object.assign(secret ? {Authorization: "Bearer " + secret} : {}, extra || {});
}

function askSecret(message) {
  const box = document.getElementById("pools");
  const input = el("input", {type: "password", autocomplete: "current-password", "aria-label": "secret"});
  const form = el("form", {class: "secret"}, el("p", {}, message), input, el("button", {type: "submit"}, "Open"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("distributex-secret", input.value.trim());
    start();
  });
  box.replaceChildren(form);
  input.focus();
}

async function load(names) {
  const response = await fetch(statusUrl(names), {headers: headers({Accept: "application/json"})});
  if (response.status === 401 || response.status === 403) {
    askSecret(response.status === 401 ? "This server needs an access secret." : "That secret may not see these pools.");
    throw new Error("access");
  }
  if (!response.ok) throw new Error("status " + response.status);
  const body = await response.json();
  const now = Date.now();
  if (!names) pools.clear();
  for (const pool of body.pools) { pool.fetched = now; pools.set(pool.name, pool); }
  render();
}

function scheduleRefresh(name) {
  dirty.add(name);
  if (refreshTimer === null) {
    refreshTimer = setTimeout(() => {
      refreshTimer = null;
      const names = [...dirty];
      dirty.clear();
      load(names).catch(() => { for (const n of names) dirty.add(n); });
    }, REFRESH_DELAY_MS);
  }
}

function person(kind, p, elapsed) {
  const since = (kind === "holder" ? p.held_for : p.waited_for) + elapsed;
  const bits = [el("span", {class: "tag " + kind}, kind === "holder" ? "holds" : "wait " + p.position), " ",
                el("span", {class: "who"}, p.host)];
  if (p.session) bits.push(" ", el("span", {class: "meta"}, "session " + p.session));
  if (p.label) bits.push(" — ", p.label);
  const meta = [];
  if (kind === "holder") {
    meta.push("token " + p.token, "held " + duration(since),
              "expires in " + (p.expires_in === null ? "never" : duration(p.expires_in - elapsed)));
  } else {
    meta.push("waiting " + duration(since));
  }
  bits.push(el("div", {class: "meta"}, meta.join(" · ")));
  return el("li", {"data-host": p.host}, ...bits);
}

function render() {
  const box = document.getElementById("pools");
  const now = Date.now();
  const cards = [];
  for (const pool of [...pools.values()].sort((a, b) => a.name.localeCompare(b.name))) {
    const elapsed = (now - pool.fetched) / 1000;
    const delay = pool.lock_delay && pool.lock_delay.remaining - elapsed > 0 ? pool.lock_delay : null;
    const used = pool.holders.length;
    const state = delay ? "delay" : used ? "held" : "free";
    const label = delay ? "lock-delay until " + new Date(delay.until * 1000).toLocaleTimeString()
                        : used ? "held" : "free";
    const people = el("ul", {class: "people"},
                      ...pool.holders.map(h => person("holder", h, elapsed)),
                      ...pool.waiters.map(w => person("waiter", w, elapsed)));
    cards.push(el("article", {class: "pool " + state, "data-pool": pool.name},
                  el("h3", {}, el("span", {}, pool.name),
                     el("span", {class: "slots"}, used + "/" + pool.maxlocks)),
                  el("div", {class: "state " + state}, label),
                  people));
  }
  box.replaceChildren(...(cards.length ? cards : [el("p", {class: "empty"}, "No pools.")]));
}

function showEvent(kind, data) {
  const list = document.getElementById("events");
  const when = new Date(data.at * 1000).toLocaleTimeString();
  const who = data.host ? " " + data.host + (data.session ? " (" + data.session + ")" : "") : "";
  const token = data.token ? " token " + data.token : "";
  const item = el("li", {"data-kind": kind}, el("span", {class: "meta"}, when + " "),
                  el("span", {class: "kind"}, kind), " " + data.pool + who + token);
  list.prepend(item);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

const KINDS = ["queued", "granted", "renewed", "released", "expired", "left", "reset", "blocked"];

function onEvent(kind, text) {
  if (KINDS.includes(kind)) {
    const data = JSON.parse(text);
    showEvent(kind, data);
    scheduleRefresh(data.pool);
  } else if (kind === "gap" || kind === "dropped") {
    load().catch(() => {});
  }
}

function live(on) {
  const status = document.getElementById("connection");
  status.textContent = on ? "live" : "reconnecting…";
  status.className = "connection " + (on ? "live" : "lost");
}

let source = null;

function connect() {
  if (source) source.close();
  if (!sessionStorage.getItem("distributex-secret")) {
    // EventSource reconnects and resumes (Last-Event-ID) by itself.
    source = new EventSource("/events/");
    for (const kind of KINDS.concat(["gap", "dropped"])) {
      source.addEventListener(kind, (message) => onEvent(kind, message.data));
    }
    source.onopen = () => live(true);
    source.onerror = () => live(false);
  } else {
    follow(null);  // EventSource cannot send a secret: read the stream with fetch
  }
}

async function follow(lastId) {
  try {
    const response = await fetch("/events/", {headers: headers(lastId ? {"Last-Event-ID": lastId} : {})});
    if (!response.ok) throw new Error("events " + response.status);
    live(true);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const fields = {};
        for (const line of frame.split("\n")) {
          const colon = line.indexOf(": ");
          if (colon > 0) fields[line.slice(0, colon)] = line.slice(colon + 2);
        }
        if (fields.id) lastId = fields.id;
        if (fields.data) onEvent(fields.event || "message", fields.data);
      }
    }
  } catch (e) { /* the stream broke: try again */ }
  live(false);
  setTimeout(() => follow(lastId), 2000);
}

function start() {
  load().then(connect).catch((e) => {
    if (e.message !== "access") {
      document.getElementById("pools").textContent = "Cannot read /status/: " + e.message;
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  start();
  setInterval(() => { if (pools.size) render(); }, 1000);  // held for, expires in: the clock moves on
});
