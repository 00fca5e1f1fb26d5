// The WebSocket /v1/ws with reconnection: backoff with jitter, the browser's online and
// offline events, a ping to find dead sockets, and a state the page shows.
import { apiBase } from "./auth.js";

const PING_EVERY_MS = 20000;
const PONG_WITHIN_MS = 10000;
const MAX_BACKOFF_MS = 15000;

export class Connection {
  /**
   * @param {() => string} getToken
   * @param {{onFrame: (f: object) => void, onState: (state: string, detail: object) => void,
   *          onAuthFailed: (reason: string) => void}} handlers
   */
  constructor(getToken, handlers) {
    this.getToken = getToken;
    this.h = handlers;
    this.ws = null;
    this.state = "idle";
    this.attempt = 0;
    this.timer = null;
    this.pingTimer = null;
    this.pongTimer = null;
    this.stopped = false;
    this.onOnline = () => { if (this.state !== "connected") this.connectSoon(0); };
    this.onOffline = () => this.drop("offline");
  }

  url() {
    const u = new URL("v1/ws", apiBase);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    u.searchParams.set("access_token", this.getToken());
    return u.href;
  }

  setState(state, detail = {}) {
    this.state = state;
    this.h.onState(state, detail);
  }

  start() {
    this.stopped = false;
    addEventListener("online", this.onOnline);
    addEventListener("offline", this.onOffline);
    this.connect();
  }

  stop() {
    this.stopped = true;
    removeEventListener("online", this.onOnline);
    removeEventListener("offline", this.onOffline);
    clearTimeout(this.timer);
    this.stopPing();
    if (this.ws) this.ws.close(1000, "signed out");
    this.ws = null;
    this.setState("idle");
  }

  connect() {
    clearTimeout(this.timer);
    if (this.stopped) return;
    if (!navigator.onLine) {
      this.setState("offline");
      return;
    }
    this.setState(this.attempt ? "reconnecting" : "connecting");
    let ws;
    try {
      ws = new WebSocket(this.url());
    } catch {
      this.scheduleRetry();
      return;
    }
    this.ws = ws;
    ws.onmessage = (ev) => {
      if (ws !== this.ws) return;
      let frame;
      try { frame = JSON.parse(ev.data); } catch { return; }
      this.gotPong();
      if (frame.type === "system" && frame.event === "connected") {
        this.attempt = 0;
        this.setState("connected", frame.data || {});
        this.startPing();
      }
      if (frame.type === "pong") return;
      this.h.onFrame(frame);
    };
    ws.onclose = (ev) => {
      if (ws !== this.ws) return;
      this.ws = null;
      this.stopPing();
      if (this.stopped) return;
      if (ev.code === 4401) {
        this.stopped = true;
        this.setState("idle");
        this.h.onAuthFailed(ev.reason || "the token was refused");
        return;
      }
      if (!navigator.onLine) {
        this.setState("offline");
        return;
      }
      this.scheduleRetry();
    };
  }

  /** Close the socket now (network gone, no pong) and come back when possible. */
  drop(why) {
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      this.stopPing();
      try { ws.close(4000, why); } catch { /* already closed */ }
    }
    if (this.stopped) return;
    if (why === "offline" || !navigator.onLine) this.setState("offline");
    else this.scheduleRetry();
  }

  /** The server asked for a reconnect (it is being replaced): come back after retryAfter. */
  reconnectAfter(seconds) {
    this.attempt = Math.max(this.attempt, 1);
    this.connectSoon(Math.max(0, seconds) * 1000);
  }

  connectSoon(delayMs) {
    clearTimeout(this.timer);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      this.stopPing();
      try { ws.close(1000, "reconnecting"); } catch { /* gone */ }
    }
    const retryAt = Date.now() + delayMs;
    this.setState("waiting", { retryAt });
    this.timer = setTimeout(() => this.connect(), delayMs);
  }

  scheduleRetry() {
    this.attempt += 1;
    const base = Math.min(MAX_BACKOFF_MS, 500 * 2 ** Math.min(this.attempt - 1, 5));
    this.connectSoon(base / 2 + Math.random() * base / 2);
  }

  send(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN || this.state !== "connected") return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  startPing() {
    this.stopPing();
    this.pingTimer = setInterval(() => {
      if (this.send({ type: "ping" }) && !this.pongTimer) {
        this.pongTimer = setTimeout(() => this.drop("no answer to ping"), PONG_WITHIN_MS);
      }
    }, PING_EVERY_MS);
  }

  gotPong() {
    clearTimeout(this.pongTimer);
    this.pongTimer = null;
  }

  stopPing() {
    clearInterval(this.pingTimer);
    this.gotPong();
  }
}
