// Conversations, settings and the API key, kept in localStorage: the browser is the only place a
// conversation lives (the server keeps nothing between requests).
const CHATS = "qwenrun.chats.v1";
const SETTINGS = "qwenrun.settings.v1";
const KEY = "qwenrun.apiKey";

export const DEFAULT_SETTINGS = { system: "", temperature: "", top_p: "", max_tokens: "" };

function read(name) {
  try {
    return JSON.parse(localStorage.getItem(name));
  } catch {
    return null; // unreadable (hand-edited, or another version's): start afresh rather than fail
  }
}

function write(name, value) {
  try {
    localStorage.setItem(name, JSON.stringify(value));
  } catch (e) {
    console.warn("qwenrun: could not save to localStorage", e); // quota full: keep working in memory
  }
}

// Only well-formed messages survive a load, so the renderer never meets a non-string content.
function cleanMessage(m) {
  if (!m || typeof m !== "object" || !["user", "assistant"].includes(m.role)) return null;
  const out = { role: m.role, content: typeof m.content === "string" ? m.content : "" };
  if (m.stats && typeof m.stats === "object") out.stats = m.stats;
  if (typeof m.error === "string") out.error = m.error;
  if (m.stopped === true) out.stopped = true;
  return out;
}

export function loadChats() {
  const v = read(CHATS);
  const conversations = [];
  for (const c of Array.isArray(v?.conversations) ? v.conversations : []) {
    if (!c || typeof c.id !== "string" || !Array.isArray(c.messages)) continue;
    conversations.push({
      id: c.id,
      title: typeof c.title === "string" ? c.title : "",
      created: Number(c.created) || Date.now(),
      messages: c.messages.map(cleanMessage).filter(Boolean),
    });
  }
  const current = conversations.some((c) => c.id === v?.current) ? v.current : null;
  return { conversations, current };
}

export function saveChats(chats) {
  // Conversations with no message yet are not worth a row in the list.
  write(CHATS, { conversations: chats.conversations.filter((c) => c.messages.length), current: chats.current });
}

export function newConversation() {
  const id = Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  return { id, title: "", created: Date.now(), messages: [] };
}

export function loadSettings() {
  const v = read(SETTINGS) || {};
  const s = { ...DEFAULT_SETTINGS };
  for (const k of Object.keys(s)) if (typeof v[k] === "string") s[k] = v[k];
  return s;
}

export function saveSettings(s) {
  write(SETTINGS, s);
}

export function getApiKey() {
  return localStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}
