// The chat page: conversations in the sidebar, the current one in the middle, streaming answers
// from /v1/chat/completions. State is plain objects saved to localStorage after each change.
import { APIError, Client } from "./api.js";
import { copyText, renderMarkdown } from "./markdown.js";
import {
  getApiKey, loadChats, loadSettings, newConversation, saveChats, saveSettings, setApiKey,
} from "./store.js";

const $ = (id) => document.getElementById(id);
const client = new Client(getApiKey);
const chats = loadChats();
const settings = loadSettings();
const model = { id: null, maxLen: null };
let running = null; // {controller, conv, msg, el} while an answer streams

// -- conversations ----------------------------------------------------------------------------
function current() {
  let conv = chats.conversations.find((c) => c.id === chats.current);
  if (!conv) {
    chats.conversations = chats.conversations.filter((c) => c.messages.length); // at most one empty one
    conv = newConversation();
    chats.conversations.unshift(conv);
    chats.current = conv.id;
  }
  return conv;
}

function renderSidebar() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of chats.conversations) {
    if (!conv.messages.length) continue;
    const li = document.createElement("li");
    li.className = conv.id === chats.current ? "active" : "";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = conv.title || "(untitled)";
    open.title = conv.title;
    open.addEventListener("click", () => {
      if (running) return;
      chats.current = conv.id;
      saveChats(chats);
      renderAll();
    });
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "×";
    del.title = "Delete this conversation";
    del.addEventListener("click", () => {
      if (running?.conv === conv) return;
      chats.conversations = chats.conversations.filter((c) => c !== conv);
      if (chats.current === conv.id) chats.current = null;
      saveChats(chats);
      renderAll();
    });
    li.append(open, del);
    list.append(li);
  }
}

// -- messages ---------------------------------------------------------------------------------
function statsText(msg) {
  const s = msg.stats;
  if (!s) return msg.stopped ? "stopped" : "";
  const parts = [];
  parts.push(`${s.approx ? "~" : ""}${s.tokens} tokens`);
  if (s.tokensPerSecond) parts.push(`${s.tokensPerSecond.toFixed(1)} tok/s`);
  if (s.firstTokenSeconds != null) parts.push(`first token ${s.firstTokenSeconds.toFixed(2)} s`);
  if (s.contextTokens != null) {
    const max = s.maxModelLen;
    parts.push(max ? `context ${s.contextTokens} / ${max} (${((100 * s.contextTokens) / max).toFixed(1)}%)`
      : `context ${s.contextTokens}`);
  }
  if (msg.stopped) parts.push("stopped");
  else if (s.finishReason === "length") parts.push("cut at max_tokens");
  return parts.join(" · ");
}

function fillMessage(el, msg) {
  const body = el.querySelector(".content");
  if (msg.role === "user") body.textContent = msg.content; // the user's words, never markup
  else renderMarkdown(body, msg.content);
  el.querySelector(".stats").textContent = msg.role === "assistant" ? statsText(msg) : "";
  const err = el.querySelector(".error");
  err.textContent = msg.error || "";
  err.hidden = !msg.error;
}

function button(label, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

function messageElement(conv, msg, index) {
  const el = document.createElement("div");
  el.className = `message ${msg.role}`;
  el.dataset.index = String(index);
  el.dataset.state = running?.msg === msg ? "streaming" : "done";
  if (running?.msg === msg) running.el = el; // re-rendered mid-answer: the stream writes here now
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = msg.role === "user" ? "You" : model.id || "assistant";
  const body = document.createElement("div");
  body.className = "content";
  const error = document.createElement("div");
  error.className = "error";
  error.setAttribute("role", "alert");
  const foot = document.createElement("div");
  foot.className = "foot";
  const stats = document.createElement("span");
  stats.className = "stats";
  const actions = document.createElement("span");
  actions.className = "actions";
  if (msg.role === "user") actions.append(button("Edit", "edit", () => startEdit(conv, index, el)));
  else {
    actions.append(button("Copy", "copy-answer", () => copyText(msg.content).catch(() => {})));
    actions.append(button("Regenerate", "regenerate", () => regenerate(conv, index)));
  }
  foot.append(stats, actions);
  el.append(who, body, error, foot);
  fillMessage(el, msg);
  return el;
}

function renderMessages() {
  const conv = current();
  const box = $("messages");
  box.replaceChildren(...conv.messages.map((m, i) => messageElement(conv, m, i)));
  if (!conv.messages.length) {
    const hint = document.createElement("p");
    hint.className = "empty";
    hint.textContent = "Ask anything. Answers stream from the model on this server; nothing leaves it.";
    box.append(hint);
  }
  box.scrollTop = box.scrollHeight;
}

function renderAll() {
  renderSidebar();
  renderMessages();
  setRunning(running);
}

function startEdit(conv, index, el) {
  if (running) return;
  const msg = conv.messages[index];
  const body = el.querySelector(".content");
  const area = document.createElement("textarea");
  area.className = "edit-area";
  area.value = msg.content;
  area.rows = Math.min(12, msg.content.split("\n").length + 1);
  const save = button("Send", "save-edit", () => {
    const text = area.value.trim();
    if (!text) return;
    // Editing rewrites history from here on: later turns answered the old text.
    conv.messages = conv.messages.slice(0, index);
    if (index === 0) conv.title = "";
    ask(conv, text);
  });
  const cancel = button("Cancel", "cancel-edit", () => renderMessages());
  const bar = document.createElement("div");
  bar.className = "edit-bar";
  bar.append(save, cancel);
  body.replaceChildren(area, bar);
  area.focus();
}

function regenerate(conv, index) {
  if (running) return;
  conv.messages = conv.messages.slice(0, index);
  generate(conv);
}

// -- asking -----------------------------------------------------------------------------------
function ask(conv, text) {
  conv.messages.push({ role: "user", content: text });
  if (!conv.title) conv.title = text.split("\n")[0].slice(0, 80);
  generate(conv);
}

function requestBody(conv) {
  const messages = [];
  if (settings.system.trim()) messages.push({ role: "system", content: settings.system });
  for (const m of conv.messages) {
    if (m.role === "assistant" && !m.content) continue; // a failed answer carries nothing to the model
    messages.push({ role: m.role, content: m.content });
  }
  const body = { messages };
  if (model.id) body.model = model.id;
  // Empty fields are left out: the server then applies the model's generation_config defaults.
  for (const [name, parse] of [["temperature", Number], ["top_p", Number], ["max_tokens", (v) => parseInt(v, 10)]]) {
    const v = settings[name].trim();
    if (v !== "" && Number.isFinite(parse(v))) body[name] = parse(v);
  }
  return body;
}

function setRunning(run) {
  running = run;
  $("send").hidden = !!run;
  $("stop").hidden = !run;
  for (const b of document.querySelectorAll(".message .edit, .message .regenerate")) b.disabled = !!run;
}

async function generate(conv) {
  const msg = { role: "assistant", content: "" };
  conv.messages.push(msg);
  const controller = new AbortController();
  const run = { controller, conv, msg, el: null };
  setRunning(run);
  saveChats(chats);
  renderAll(); // sets run.el
  const box = $("messages");
  const t0 = performance.now();
  let tFirst = null;
  let deltas = 0;
  let usage = null;
  let finishReason = null;
  let frame = 0;
  let saved = performance.now();
  const redraw = () => {
    frame = 0;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    fillMessage(run.el, msg);
    if (atBottom) box.scrollTop = box.scrollHeight; // follow the answer unless the user scrolled up
    if (performance.now() - saved > 1000) { // a reload mid-answer keeps what had arrived
      saveChats(chats);
      saved = performance.now();
    }
  };
  try {
    for await (const chunk of client.streamChat(requestBody(conv), controller.signal)) {
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      if (choice.finish_reason) finishReason = choice.finish_reason;
      const delta = choice.delta?.content;
      if (delta) {
        tFirst ??= performance.now();
        deltas += 1;
        msg.content += delta;
        if (!frame) frame = requestAnimationFrame(redraw); // at most one render per frame
      }
    }
  } catch (e) {
    if (e.name === "AbortError") msg.stopped = true;
    else {
      msg.error = e instanceof APIError ? `Error ${e.status}: ${e.message}` : `Error: ${e.message}`;
      if (e instanceof APIError && e.status === 401) openKeyDialog(e.message);
    }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    const tEnd = performance.now();
    const tokens = usage ? usage.completion_tokens : deltas;
    if (tokens || usage) {
      // Decode speed: tokens after the first over the time after the first (prefill excluded).
      const decodeSeconds = tFirst != null ? (tEnd - tFirst) / 1000 : 0;
      msg.stats = {
        tokens,
        approx: !usage, // stopped early: the usage chunk never came; one delta ≈ one token
        tokensPerSecond: decodeSeconds > 0 && tokens > 1 ? (tokens - 1) / decodeSeconds : null,
        firstTokenSeconds: tFirst != null ? (tFirst - t0) / 1000 : null,
        contextTokens: usage ? usage.total_tokens : null,
        maxModelLen: model.maxLen,
        finishReason,
      };
    }
    setRunning(null);
    saveChats(chats);
    renderAll();
  }
}

// -- API key ----------------------------------------------------------------------------------
function openKeyDialog(message) {
  const dialog = $("key-dialog");
  $("key-error").textContent = message || "";
  $("key-input").value = getApiKey();
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

async function saveKey(e) {
  e.preventDefault();
  setApiKey($("key-input").value.trim());
  try {
    await refreshModel();
    $("key-dialog").close();
  } catch (err) {
    // Stay open with the server's words: "Unauthorized: a wrong API key was given ..."
    $("key-error").textContent = err.message;
  }
}

// -- server status ----------------------------------------------------------------------------
async function refreshModel() {
  const card = await client.model();
  model.id = card.id;
  model.maxLen = card.max_model_len ?? null;
  $("model-name").textContent = card.id;
  document.title = `${card.id} · qwenrun chat`;
}

async function watchServer() {
  try {
    await refreshModel();
  } catch (e) {
    if (e instanceof APIError && e.status === 401) openKeyDialog(e.message);
    else $("status").textContent = `server: ${e.message}`;
  }
  for (;;) { // the model loads after the listener starts: show it, then pick up max_model_len
    let status;
    try {
      status = await client.healthStatus();
    } catch {
      status = 0;
    }
    $("status").textContent = status === 200 ? "ready" : status === 503 ? "loading the model…" : "server unreachable";
    $("status").className = status === 200 ? "ready" : "waiting";
    if (status === 200) {
      if (model.maxLen == null) refreshModel().catch(() => {});
      return;
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

// -- wiring -----------------------------------------------------------------------------------
function bindSettings() {
  for (const name of Object.keys(settings)) {
    const input = $(name);
    input.value = settings[name];
    input.addEventListener("input", () => {
      settings[name] = input.value;
      saveSettings(settings);
    });
  }
}

function main() {
  bindSettings();
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || running) return;
    $("input").value = "";
    ask(current(), text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => running?.controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (running) return;
    chats.current = null;
    renderAll();
    $("input").focus();
  });
  $("api-key-button").addEventListener("click", () => openKeyDialog(""));
  $("key-form").addEventListener("submit", saveKey);
  $("key-cancel").addEventListener("click", () => $("key-dialog").close());
  // Copy buttons of code blocks: one listener for all, as blocks are re-rendered while streaming.
  $("messages").addEventListener("click", async (e) => {
    const copy = e.target.closest(".code-block .copy");
    if (!copy) return;
    try {
      await copyText(copy.closest(".code-block").querySelector("code").textContent);
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Copy failed"; // clipboard permission refused
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });
  renderAll();
  watchServer();
}

main();
