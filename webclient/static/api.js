// The HTTP API (PROTOCOL.md, "HTTP"): JSON in and out, errors as {"error": {code, message}}.
import { apiBase } from "./auth.js";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export class Api {
  constructor(getToken) {
    this.getToken = getToken;
  }

  url(path) {
    return new URL(path.replace(/^\//, ""), apiBase);
  }

  async request(method, path, body, headers = {}) {
    const init = { method, headers: { Authorization: `Bearer ${this.getToken()}`, ...headers } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let r;
    try {
      r = await fetch(this.url(path), init);
    } catch {
      throw new ApiError(0, "network", "the server cannot be reached");
    }
    let data = null;
    try {
      data = await r.json();
    } catch { /* empty or not JSON */ }
    if (!r.ok) {
      const e = data && data.error;
      throw Object.assign(new ApiError(r.status, e?.code || `http_${r.status}`, e?.message || r.statusText),
        { body: data });
    }
    return data;
  }

  chats() { return this.request("GET", "v1/chats"); }
  createChat(members, title) { return this.request("POST", "v1/chats", { members, title: title || null }); }
  messages(chatId, afterSeq, limit) {
    const q = new URLSearchParams({ afterSeq: String(afterSeq), limit: String(limit) });
    return this.request("GET", `v1/chats/${encodeURIComponent(chatId)}/messages?${q}`);
  }
  presence(users) {
    return this.request("GET", `v1/presence?${new URLSearchParams({ userId: users.join(",") })}`);
  }
  complete(attachmentId, uploadToken) {
    return this.request("POST", `v1/attachments/${encodeURIComponent(attachmentId)}/complete`, undefined,
      { "X-Upload-Token": uploadToken });
  }

  /** The attachment's bytes (members only), as a Blob. */
  async attachment(attachmentId) {
    const r = await fetch(this.url(`v1/attachments/${encodeURIComponent(attachmentId)}/content`), {
      headers: { Authorization: `Bearer ${this.getToken()}` },
    });
    if (!r.ok) {
      let e = null;
      try { e = (await r.json()).error; } catch { /* not JSON */ }
      throw new ApiError(r.status, e?.code || `http_${r.status}`, e?.message || r.statusText);
    }
    return r.blob();
  }
}

/** The upload URL as this page should call it: the embedded store's URL names the
 * configured public address; a loopback alias of this page's own origin is used as is. */
export function sameOriginUpload(uploadUrl) {
  const u = new URL(uploadUrl, apiBase);
  const loop = (h) => ["127.0.0.1", "localhost", "[::1]"].includes(h);
  if (u.origin !== location.origin && loop(u.hostname) && loop(location.hostname) && u.port === location.port) {
    return new URL(u.pathname + u.search, location.origin).href;
  }
  return u.href;
}

/** PUT a file with progress (fetch has no upload progress). Resolves {status, json}. */
export function putWithProgress(url, file, contentType, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", url);
    xhr.setRequestHeader("Content-Type", contentType);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let json = null;
      try { json = JSON.parse(xhr.responseText); } catch { /* storage answers XML or nothing */ }
      resolve({ status: xhr.status, json });
    };
    xhr.onerror = () => reject(new ApiError(0, "network", "the upload failed (network)"));
    xhr.send(file);
  });
}
