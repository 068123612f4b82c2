// Model output → DOM, never executed: Markdown (marked) with raw HTML shown as literal text,
// sanitized (DOMPurify) into a fragment, then code blocks highlighted (highlight.js) and given a
// copy button. The page's Content-Security-Policy is the second wall: no inline script or
// handler would run even if this path let one through.
const { marked, DOMPurify, hljs } = window;

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
export const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ESCAPES[c]);

// A chat answer that contains HTML (a coding model writes plenty) means it as text to read, not
// markup to obey: marked's html tokens (block and inline) come out escaped.
const md = new marked.Marked({
  gfm: true,
  breaks: true,
  renderer: { html: ({ text }) => escapeHtml(text) },
});

const PURIFY = { USE_PROFILES: { html: true }, RETURN_DOM_FRAGMENT: true };

// Links in answers open in a new tab and carry no referrer or opener into the other page.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

function decorateCode(code) {
  const pre = code.parentElement;
  const lang = [...code.classList].find((c) => c.startsWith("language-"))?.slice("language-".length);
  const source = code.textContent;
  const result = lang && hljs.getLanguage(lang)
    ? hljs.highlight(source, { language: lang, ignoreIllegals: true })
    : hljs.highlightAuto(source);
  // highlight.js escapes the text it wraps in spans; the sanitizer checks that once more.
  code.replaceChildren(DOMPurify.sanitize(result.value, PURIFY));
  code.classList.add("hljs");
  const block = document.createElement("div");
  block.className = "code-block";
  const bar = document.createElement("div");
  bar.className = "code-bar";
  const label = document.createElement("span");
  label.textContent = lang || result.language || "text";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = "Copy";
  bar.append(label, copy);
  pre.replaceWith(block);
  block.append(bar, pre);
}

export function renderMarkdown(el, text) {
  const fragment = DOMPurify.sanitize(md.parse(text), PURIFY);
  el.replaceChildren(fragment);
  for (const code of el.querySelectorAll("pre > code")) decorateCode(code);
}

// navigator.clipboard needs a secure context (https or loopback); elsewhere the old way.
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}
