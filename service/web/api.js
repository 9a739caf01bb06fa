// Calls to this server's API with the page's API key; every error answered as the API words it.

let apiKey = "";

export function setApiKey(key) {
  apiKey = key.trim();
}

function headers(extra = {}) {
  return apiKey ? { ...extra, "X-API-Key": apiKey } : extra;
}

/** An error the API answered: `status`, `code` and the API's own `message`. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function failure(resp) {
  let code = "error", message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error) ({ code, message } = body.error);
  } catch (e) { /* not JSON: keep the status line */ }
  return new ApiError(resp.status, code, message);
}

/** fetch(path) with the key; throws ApiError on an error status, answers the Response. */
export async function call(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: headers(options.headers) });
  if (!resp.ok) throw await failure(resp);
  return resp;
}

export async function getJson(path) {
  return (await call(path)).json();
}

export async function postJson(path, body) {
  const resp = await call(path, {
    method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" },
  });
  return resp.json();
}

/** POST /v1/jobs as multipart: the JSON in part `request`, each file in its own part. */
export async function submitJob(request, files) {
  const form = new FormData();
  form.append("request", JSON.stringify(request));
  for (const [name, blob] of Object.entries(files)) form.append(name, blob, blob.name || name);
  const resp = await call("/v1/jobs", { method: "POST", body: form });
  return resp.json();
}

/** Follows GET /v1/jobs/{id}/events (read with fetch, so the key goes as a header), calling
 * onEvent(name, data) per event until the stream ends or `signal` aborts it. */
export async function followEvents(jobId, onEvent, signal) {
  const resp = await call(`/v1/jobs/${jobId}/events`, { signal });
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = parseEvent(block);
      if (event) onEvent(event.name, event.data);
    }
  }
}

function parseEvent(block) {
  let name = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  return data ? { name, data: JSON.parse(data) } : null;
}
