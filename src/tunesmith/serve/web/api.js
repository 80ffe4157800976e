// The page is an ordinary client of the server's OpenAI-compatible API: the same routes, the same
// `Authorization: Bearer KEY`, the same error envelope. A 401 asks the user for the key (once, then it is
// kept for the tab, or in localStorage if they ask) and retries.

const STORE = 'tunesmith-api-key';
let key = sessionStorage.getItem(STORE) || localStorage.getItem(STORE) || null;
let askKey = null; // async (message) => {key, remember} | null, set by app.js
let asking = null; // one prompt at a time, however many requests are waiting for it

export class APIError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = error?.code ?? null;
    this.param = error?.param ?? null;
  }
}

export function setKeyPrompt(prompt) {
  askKey = prompt;
}

export function hasKey() {
  return key !== null;
}

export function forgetKey() {
  key = null;
  sessionStorage.removeItem(STORE);
  localStorage.removeItem(STORE);
}

async function newKey(message) {
  if (!askKey) return false;
  asking ??= askKey(message).finally(() => { asking = null; });
  const given = await asking;
  if (!given?.key) return false;
  key = given.key;
  sessionStorage.setItem(STORE, key);
  if (given.remember) localStorage.setItem(STORE, key);
  else localStorage.removeItem(STORE);
  return true;
}

async function failure(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    // not the envelope (a proxy's page): the status says enough
  }
  return new APIError(response.status, error);
}

// fetch(path) with the key; the parsed JSON body, or the Response itself with {raw: true}. Non-2xx: APIError.
// `body` is sent as JSON, or as multipart when it is FormData (an upload; the browser writes its boundary).
export async function api(path, { method, body, signal, raw = false } = {}) {
  const form = body instanceof FormData;
  for (let attempt = 0; ; attempt += 1) {
    const headers = {};
    if (key) headers.Authorization = `Bearer ${key}`;
    if (body !== undefined && !form) headers['Content-Type'] = 'application/json';
    const response = await fetch(path, {
      method: method || (body === undefined ? 'GET' : 'POST'), headers, signal,
      body: body === undefined || form ? body : JSON.stringify(body),
    });
    if (response.status === 401 && attempt < 3) {
      const error = await failure(response);
      if (await newKey(attempt === 0 && !key ? '' : error.message)) continue;
      throw error;
    }
    if (!response.ok) throw await failure(response);
    return raw ? response : response.json();
  }
}

// Server-sent events of a streamed completion: yields each chunk's JSON until `data: [DONE]`. Aborting
// `signal` closes the connection, and the server stops generating for a client that hung up.
export async function* stream(path, body, signal) {
  const response = await api(path, { body: { ...body, stream: true }, signal, raw: true });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error('The server closed the stream before it was done.');
      buffer += value;
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split('\n').filter((line) => line.startsWith('data:'))
          .map((line) => line.slice(5).trimStart()).join('\n');
        if (!data) continue;
        if (data === '[DONE]') return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new APIError(500, chunk.error); // generation failed after the stream began
        yield chunk;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
