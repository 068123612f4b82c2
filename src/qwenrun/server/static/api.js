// The page's client of qwenrun's OpenAI API. URLs are relative to the page, so the page also
// works behind a reverse proxy that serves qwenrun under a path prefix.

export class APIError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// An OpenAI-shaped error body ({"error": {"message", "code"}}) as one readable APIError.
async function errorOf(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  let code = null;
  try {
    const body = await resp.json();
    if (body?.error?.message) message = body.error.message;
    code = body?.error?.code ?? null;
  } catch {
    // not JSON (a proxy's error page): the status line is the best we have
  }
  return new APIError(resp.status, message, code);
}

export class Client {
  constructor(getKey) {
    this.getKey = getKey;
  }

  headers() {
    const h = { "Content-Type": "application/json" };
    const key = this.getKey();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  // The served model's card: {id, max_model_len (once loaded), ...}.
  async model() {
    const resp = await fetch("v1/models", { headers: this.headers() });
    if (!resp.ok) throw await errorOf(resp);
    return (await resp.json()).data[0];
  }

  async healthStatus() {
    return (await fetch("health")).status;
  }

  // Streams /v1/chat/completions: yields each parsed chunk. Aborting `signal` closes the
  // connection, which makes the server abort the request and free its KV cache at once.
  async *streamChat(body, signal) {
    const resp = await fetch("v1/chat/completions", {
      method: "POST",
      headers: this.headers(),
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
      signal,
    });
    if (!resp.ok) throw await errorOf(resp);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) { // one SSE event per blank-line-terminated block
        const event = buf.slice(0, end);
        buf = buf.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          const chunk = JSON.parse(data);
          // After the 200 the server reports failures in-band, as an OpenAI error object.
          if (chunk.error) throw new APIError(500, chunk.error.message, chunk.error.code);
          yield chunk;
        }
      }
    }
  }
}
