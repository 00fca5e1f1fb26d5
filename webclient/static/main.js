// Conveyor's web client: sign-in, chat list, conversation. Speaks PROTOCOL.md only.
import { Api, ApiError, putWithProgress, sameOriginUpload } from "./api.js";
import {
  clearSession, currentSession, devSignIn, finishOidc, loadConfig, randomId, refreshOidc, saveSession,
  startOidc,
} from "./auth.js";
import { Connection } from "./conn.js";
import { el, fileSize, nearBottom, shortTime, ticksView } from "./view.js";

const PAGE = 30;                 // history page (GET /v1/chats/{id}/messages)
const SYNC_LIMIT = 100;          // catch-up page (sync frames)
const TYPING_EVERY_MS = 3000;    // a typing signal at most this often while typing
const TYPING_IDLE_MS = 4000;     // typing stopped after this long without input
const TYPING_SHOWN_MS = 6000;    // a peer's typing indicator fades after this
const REACTIONS = ["👍", "❤️", "😂", "🎉"];

const $ = (id) => document.getElementById(id);

const S = {
  cfg: { auth: { mode: "token" } },
  session: null,
  api: null,
  conn: null,
  me: null,
  everConnected: false,
  chats: new Map(),        // chatId -> chat (see newChat)
  openId: null,
  presence: new Map(),     // userId -> {online, lastSeen}
  pending: new Map(),      // client frame id -> {kind, frame, chatId, ...} until its ack
  uploads: new Map(),      // attachment frame id -> upload row state
  blobs: new Map(),        // attachmentId -> Promise<object URL>
  arrived: new Set(),      // attachment ids whose message this client has received
  receiptTimer: null,
  typingSent: { at: 0, chatId: null, timer: null },
  refreshTimer: null,
  creditsTimer: null,
};

// --- the chat model -------------------------------------------------------------------
function newChat(c) {
  return {
    chatId: c.chatId, title: c.title || null, members: c.members || [],
    lastSeq: c.lastSeq || 0, unreadCount: c.unreadCount || 0,
    unreadUpto: c.lastSeq || 0, // unreadCount accounts for everything up to this seq
    items: new Map(),      // seq -> item (message or command event)
    byId: new Map(),       // messageId -> message item
    seen: new Set(),       // command event ids already applied or known
    outgoing: new Map(),   // client id -> {clientId, body, status, error} not acked yet
    low: null,             // lowest seq loaded
    tail: 0,               // highest seq loaded with nothing missing below it (down to low)
    loaded: false,
    // what this client told the server (its own pointers)
    deliveredSent: c.deliveredSeq || 0, readSent: c.readSeq || 0,
    deliveredQueued: null, readQueued: null,
    // userId -> {delivered, read}: the other members' pointers as the server reports them
    // (`peers` in GET /v1/chats, then `receipt` system events); the ticks come from these
    peers: peersFrom(c.peers),
    typing: new Map(),     // userId -> expiry (ms)
  };
}

function peersFrom(list) {
  const peers = new Map();
  for (const p of Array.isArray(list) ? list : []) {
    if (p && typeof p.userId === "string") {
      peers.set(p.userId, { delivered: Number(p.deliveredSeq) || 0, read: Number(p.readSeq) || 0 });
    }
  }
  return peers;
}

function chatName(chat) {
  if (chat.title) return chat.title;
  const others = chat.members.filter((m) => m !== S.me);
  return others.length ? others.join(", ") : "Just you";
}

function othersOf(chat) {
  return chat.members.filter((m) => m !== S.me);
}

function lastMessage(chat) {
  let best = null;
  for (const it of chat.items.values()) {
    if (it.type === "message" && (!best || it.seq > best.seq)) best = it;
  }
  return best;
}

function preview(m) {
  if (!m) return "No messages yet";
  const who = m.senderId === S.me ? "You" : m.senderId;
  if (m.deleted) return `${who}: message deleted`;
  if (m.kind === "attachment") return `${who}: file ${m.attachment?.fileName || m.body || ""}`;
  return `${who}: ${m.body ?? ""}`;
}

function advanceTail(chat) {
  if (!chat.loaded) return;
  while (chat.items.has(chat.tail + 1)) chat.tail += 1;
}

/** Apply a batch of items: history pages and sync frames are snapshots (messages in their
 * current state); live frames are events. A command is applied to its target only when the
 * target is loaded, is not part of this batch (a snapshot already includes it), and the
 * command was not seen before. */
function applyItems(chat, items, { snapshot }) {
  const inBatch = new Set(items.filter((i) => i.type === "message").map((i) => i.messageId));
  const changed = [];
  for (const raw of items) {
    const item = { ...raw, type: raw.type || "message" };
    chat.lastSeq = Math.max(chat.lastSeq, item.seq || 0);
    if (item.type === "command") {
      const eid = item.eventId || `${item.op}:${item.seq}`;
      chat.items.set(item.seq, item);
      if (chat.seen.has(eid)) continue;
      chat.seen.add(eid);
      const target = chat.byId.get(item.messageId);
      if (target && !inBatch.has(item.messageId)) {
        applyCommand(target, item);
        changed.push(target);
      }
      continue;
    }
    const known = chat.byId.get(item.messageId);
    if (known && !snapshot) continue;          // a redelivery: same id, nothing new
    const merged = known ? Object.assign(known, {
      body: item.body, deleted: !!item.deleted, editedAt: item.editedAt || null,
      reactions: item.reactions || {}, attachment: item.attachment || null,
    }) : { ...item, reactions: item.reactions || {} };
    chat.items.set(merged.seq, merged);
    chat.byId.set(merged.messageId, merged);
    changed.push(merged);
  }
  advanceTail(chat);
  return changed;
}

function applyCommand(target, cmd) {
  if (cmd.op === "edit") {
    target.body = cmd.body;
    target.editedAt = cmd.createdAt || new Date().toISOString();
  } else if (cmd.op === "delete") {
    target.deleted = true;
    target.body = null;
    target.attachment = null;
  } else if (cmd.op === "react" && cmd.emoji) {
    const n = (target.reactions[cmd.emoji] || 0) + (cmd.added === false ? -1 : 1);
    if (n > 0) target.reactions[cmd.emoji] = n;
    else delete target.reactions[cmd.emoji];
  }
}

// --- sign-in --------------------------------------------------------------------------
function showSignin(message) {
  $("chat-view").hidden = true;
  $("composer").hidden = true;
  $("me").hidden = true;
  $("signin-view").hidden = false;
  const err = $("signin-error");
  err.hidden = !message;
  err.textContent = message || "";
  const auth = S.cfg.auth;
  $("dev-form").hidden = auth.mode !== "dev";
  $("oidc-form").hidden = auth.mode !== "oidc";
  if (auth.mode === "oidc") $("oidc-issuer").textContent = new URL(auth.issuer).host;
  const first = auth.mode === "dev" ? $("dev-user") : auth.mode === "oidc" ? $("oidc-start") : $("token-input");
  first.focus();
}

function wireSignin() {
  $("dev-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      enter(await devSignIn($("dev-user").value.trim()));
    } catch (e) {
      showSignin(`Sign-in failed: ${e.message}`);
    }
  });
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    try {
      enter(saveSession($("token-input").value.trim(), "token"));
    } catch (e) {
      showSignin(`This token cannot be used: ${e.message}`);
    }
  });
  $("oidc-start").addEventListener("click", () => startOidc(S.cfg.auth).catch((e) => showSignin(e.message)));
  $("sign-out").addEventListener("click", () => signOut());
}

function signOut(message) {
  if (S.conn) S.conn.stop();
  clearTimeout(S.refreshTimer);
  clearSession();
  for (const p of S.blobs.values()) p.then((u) => u && URL.revokeObjectURL(u)).catch(() => {});
  Object.assign(S, {
    session: null, api: null, conn: null, me: null, everConnected: false, openId: null,
    chats: new Map(), presence: new Map(), pending: new Map(), uploads: new Map(), blobs: new Map(),
    arrived: new Set(),
  });
  $("messages").replaceChildren();
  $("chat-list").replaceChildren();
  $("uploads").replaceChildren();
  $("banners").replaceChildren();
  $("conv-title").textContent = "Pick a chat";
  showConnState("idle");
  showSignin(message);
}

function scheduleRefresh() {
  clearTimeout(S.refreshTimer);
  const s = S.session;
  if (!s || s.via !== "oidc" || !s.refreshToken || !s.exp) return;
  const inMs = Math.max(5000, s.exp * 1000 - Date.now() - 60000);
  S.refreshTimer = setTimeout(async () => {
    try {
      S.session = await refreshOidc(S.cfg.auth, S.session);
      scheduleRefresh();
    } catch (e) {
      signOut(`Your session ended: ${e.message}`);
    }
  }, inMs);
}

async function enter(session) {
  S.session = session;
  S.me = session.userId;
  S.api = new Api(() => S.session.token);
  $("signin-view").hidden = true;
  $("chat-view").hidden = false;
  $("me").hidden = false;
  $("me-name").textContent = S.me;
  $("token-input").value = "";
  scheduleRefresh();
  try {
    await refreshChats();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return signOut(`The token was refused: ${e.message}`);
    banner("load", `Could not load your chats: ${e.message}`, "error");
  }
  S.conn = new Connection(() => S.session.token, {
    onFrame,
    onState: showConnState,
    onAuthFailed: (reason) => signOut(`Signed out: ${reason}`),
  });
  S.conn.start();
  (S.chats.size ? null : $("new-members"))?.focus();
}

// --- connection state -----------------------------------------------------------------
let countdown = null;
function showConnState(state, detail = {}) {
  const box = $("conn-state");
  box.dataset.state = state;
  clearInterval(countdown);
  const text = {
    idle: "Not connected",
    connecting: "Connecting…",
    reconnecting: "Reconnecting…",
    connected: "Connected",
    offline: "Offline: waiting for the network",
  };
  if (state === "waiting") {
    const tick = () => {
      const s = Math.max(0, Math.ceil((detail.retryAt - Date.now()) / 1000));
      box.textContent = `Disconnected: reconnecting in ${s} s`;
    };
    tick();
    countdown = setInterval(tick, 1000);
  } else {
    box.textContent = text[state] || state;
  }
  if (state === "connected") onConnected();
}

async function onConnected() {
  const again = S.everConnected;
  S.everConnected = true;
  dismiss("reconnect");
  // Frames not acked yet go again with the same ids: the server dedupes them.
  for (const [id, p] of S.pending) {
    if (p.kind === "sync") S.pending.delete(id);
    else S.conn.send(p.frame);
  }
  if (again) {
    try {
      await refreshChats();
    } catch (e) {
      banner("load", `Could not refresh your chats: ${e.message}`, "error");
    }
  }
  // Catch up every loaded chat from where it is complete.
  for (const chat of S.chats.values()) {
    if (chat.loaded && chat.lastSeq > chat.tail) sendSync(chat);
  }
  if (S.openId) markRead(S.chats.get(S.openId));
}

function sendSync(chat) {
  const id = `s-${randomId(8)}`;
  const frame = { type: "sync", id, chatId: chat.chatId, afterSeq: chat.tail, limit: SYNC_LIMIT };
  S.pending.set(id, { kind: "sync", chatId: chat.chatId, frame });
  S.conn.send(frame);
}

function sendTracked(frame, meta) {
  S.pending.set(frame.id, { ...meta, frame });
  S.conn?.send(frame);
}

// --- chats ----------------------------------------------------------------------------
async function refreshChats() {
  const { chats } = await S.api.chats();
  const loads = [];
  for (const c of chats) {
    let chat = S.chats.get(c.chatId);
    if (!chat) {
      chat = newChat(c);
      S.chats.set(c.chatId, chat);
      loads.push(loadTail(chat));
    } else {
      chat.members = c.members;
      chat.title = c.title || null;
      chat.lastSeq = Math.max(chat.lastSeq, c.lastSeq);
      chat.unreadCount = S.openId === c.chatId && !document.hidden ? 0 : c.unreadCount;
      chat.unreadUpto = Math.max(chat.unreadUpto, c.lastSeq);
      // Receipt events sent while this client was away are in the listed positions.
      for (const [userId, p] of peersFrom(c.peers)) movePeer(chat, userId, p.delivered, p.read);
      if (!chat.loaded) loads.push(loadTail(chat));
    }
  }
  await Promise.all(loads);
  await refreshPresence();
  renderChatList();
  if (S.openId) {
    renderConversationHead();
    renderTicks(S.chats.get(S.openId));
  }
}

/** The newest page of a chat (then whatever is newer still). */
async function loadTail(chat) {
  let after = Math.max(0, chat.lastSeq - PAGE);
  if (!chat.loaded) {
    chat.low = after + 1;
    chat.tail = after;
    chat.loaded = true;
  }
  after = Math.max(after, chat.tail);
  for (;;) {
    const page = await S.api.messages(chat.chatId, after, PAGE);
    applyItems(chat, page.messages, { snapshot: true });
    if (!page.hasMore || !page.messages.length) break;
    after = page.messages[page.messages.length - 1].seq;
  }
}

async function loadEarlier() {
  const chat = S.chats.get(S.openId);
  if (!chat || chat.low <= 1) return;
  const newLow = Math.max(1, chat.low - PAGE);
  const log = $("log");
  const fromBottom = log.scrollHeight - log.scrollTop;
  const btn = $("load-earlier");
  btn.disabled = true;
  btn.textContent = "Loading…";
  try {
    const page = await S.api.messages(chat.chatId, newLow - 1, chat.low - newLow);
    applyItems(chat, page.messages, { snapshot: true });
    chat.low = newLow;
    renderMessages();
    log.scrollTop = log.scrollHeight - fromBottom;
    const first = $("messages").querySelector(".msg");
    first?.focus();
  } catch (e) {
    banner("history", `Could not load earlier messages: ${e.message}`, "error");
  } finally {
    btn.disabled = false;
    btn.textContent = "Load earlier messages";
    $("load-earlier").hidden = !(chat.low > 1);
  }
}

async function refreshPresence() {
  const users = new Set();
  for (const c of S.chats.values()) for (const m of c.members) if (m !== S.me) users.add(m);
  const list = [...users].slice(0, 500);
  if (!list.length) return;
  try {
    const { users: found } = await S.api.presence(list);
    for (const u of found) S.presence.set(u.userId, { online: u.online, lastSeen: u.lastSeen });
  } catch { /* presence is a nicety: the dots stay grey */ }
}

function presenceDot(userId) {
  const p = S.presence.get(userId);
  const online = !!p?.online;
  const label = online ? `${userId} is online`
    : p?.lastSeen ? `${userId} is offline, last seen ${shortTime(p.lastSeen)}` : `${userId} is offline`;
  return el("span", { class: "presence", "data-user": userId, "data-online": String(online),
    role: "img", "aria-label": label, title: label });
}

function renderChatList() {
  const list = $("chat-list");
  const chats = [...S.chats.values()].sort((a, b) => {
    const la = lastMessage(a)?.createdAt || "", lb = lastMessage(b)?.createdAt || "";
    return lb.localeCompare(la) || a.chatId.localeCompare(b.chatId);
  });
  $("no-chats").hidden = chats.length > 0;
  const focused = document.activeElement?.closest?.("#chat-list li")?.dataset.chatId;
  list.replaceChildren(...chats.map((chat) => {
    const others = othersOf(chat);
    const unread = chat.unreadCount > 0
      ? el("span", { class: "unread", "aria-label": `${chat.unreadCount} unread` }, String(chat.unreadCount))
      : null;
    const btn = el("button", {
      type: "button", class: "chat-item", "aria-current": chat.chatId === S.openId ? "true" : null,
      onclick: () => openChat(chat.chatId),
    },
    el("span", { class: "chat-line" },
      others.length === 1 ? presenceDot(others[0]) : null,
      el("span", { class: "chat-name" }, chatName(chat)),
      unread),
    el("span", { class: "chat-last" }, preview(lastMessage(chat))));
    return el("li", { "data-chat-id": chat.chatId }, btn);
  }));
  if (focused) list.querySelector(`li[data-chat-id="${CSS.escape(focused)}"] button`)?.focus();
}

async function createChat(ev) {
  ev.preventDefault();
  const members = $("new-members").value.split(/[\s,]+/).map((m) => m.trim()).filter(Boolean);
  if (!members.length) return;
  try {
    const c = await S.api.createChat(members, $("new-title").value.trim());
    const chat = S.chats.get(c.chatId) || newChat({ ...c, lastSeq: 0 });
    chat.members = c.members;
    chat.loaded = true;
    chat.low = 1;
    S.chats.set(c.chatId, chat);
    $("new-members").value = "";
    $("new-title").value = "";
    await refreshPresence();
    renderChatList();
    openChat(c.chatId);
  } catch (e) {
    banner("create", `Could not create the chat: ${e.message}`, "error");
  }
}

function openChat(chatId) {
  const chat = S.chats.get(chatId);
  if (!chat) return;
  S.openId = chatId;
  $("composer").hidden = false;
  renderConversationHead();
  renderMessages();
  renderUploads();
  $("log").scrollTop = $("log").scrollHeight;
  markRead(chat);
  renderChatList();
  $("composer-input").focus();
}

function renderConversationHead() {
  const chat = S.chats.get(S.openId);
  if (!chat) return;
  $("conv-title").textContent = chatName(chat);
  $("conv-members").replaceChildren(...chat.members.map((m) => el("li", {},
    m === S.me ? null : presenceDot(m), m === S.me ? `${m} (you)` : m)));
  renderTyping();
}

function renderTyping() {
  const chat = S.chats.get(S.openId);
  const box = $("typing");
  if (!chat) return;
  const now = Date.now();
  const who = [...chat.typing].filter(([, until]) => until > now).map(([u]) => u);
  const text = who.length === 0 ? "" : who.length === 1 ? `${who[0]} is typing…` : `${who.join(", ")} are typing…`;
  if (box.textContent !== text) box.textContent = text;
}

// --- messages -------------------------------------------------------------------------
function renderMessages() {
  const chat = S.chats.get(S.openId);
  const ol = $("messages");
  if (!chat) return ol.replaceChildren();
  const items = [...chat.items.values()].filter((i) => i.type === "message").sort((a, b) => a.seq - b.seq);
  ol.replaceChildren(...items.map((m) => messageView(chat, m)), ...[...chat.outgoing.values()].map(outgoingView));
  $("load-earlier").hidden = !(chat.low > 1);
}

function messageId(m) {
  return `msg-${m.messageId}`;
}

/** Replace (or insert, in seq order) one message of the open chat, keeping focus. */
function updateMessage(chat, m) {
  if (chat.chatId !== S.openId) return;
  const ol = $("messages");
  const old = document.getElementById(messageId(m));
  const action = old?.contains(document.activeElement) ? document.activeElement.dataset.action : null;
  const fresh = messageView(chat, m);
  if (old) {
    old.replaceWith(fresh);
  } else {
    const next = [...ol.querySelectorAll("li.msg[data-seq]")].find((li) => Number(li.dataset.seq) > m.seq)
      || ol.querySelector("li.outgoing");
    ol.insertBefore(fresh, next || null);
  }
  if (action) (fresh.querySelector(`[data-action="${action}"]`) || fresh).focus();
}

function tickState(chat, m) {
  const others = othersOf(chat);
  if (!others.length) return { status: "sent", label: "Sent" };
  const read = others.filter((u) => (chat.peers.get(u)?.read || 0) >= m.seq);
  const delivered = others.filter((u) => Math.max(chat.peers.get(u)?.delivered || 0,
    chat.peers.get(u)?.read || 0) >= m.seq);
  if (read.length === others.length) return { status: "read", label: `Read by ${read.join(", ")}` };
  if (delivered.length === others.length) return { status: "delivered", label: `Delivered to ${delivered.join(", ")}` };
  return { status: "sent", label: "Sent: stored by the server" };
}

function messageView(chat, m) {
  const mine = m.senderId === S.me;
  const li = el("li", {
    id: messageId(m), class: `msg${mine ? " mine" : ""}${m.deleted ? " deleted" : ""}`,
    "data-seq": String(m.seq), "data-message-id": m.messageId, "data-sender": m.senderId, tabindex: "-1",
  });
  li.append(el("div", { class: "meta" },
    el("span", { class: "sender" }, mine ? "You" : m.senderId), " ",
    el("time", { datetime: m.createdAt }, shortTime(m.createdAt)),
    m.editedAt && !m.deleted ? el("span", { class: "edited" }, " (edited)") : null));
  if (m.deleted) {
    li.append(el("p", { class: "body tombstone" }, "Message deleted"));
  } else if (m.kind === "attachment" && m.attachment) {
    li.append(attachmentView(m.attachment));
  } else {
    li.append(el("p", { class: "body" }, m.body ?? ""));
  }
  const reactions = Object.entries(m.reactions || {});
  if (reactions.length && !m.deleted) {
    li.append(el("ul", { class: "reactions", "aria-label": "Reactions" }, ...reactions.map(([emoji, n]) =>
      el("li", {}, el("button", {
        type: "button", class: "reaction", "data-action": `reaction-${emoji}`,
        "aria-label": `${emoji} ${n}: toggle your reaction`, onclick: () => react(chat, m, emoji),
      }, `${emoji} ${n}`)))));
  }
  if (!m.deleted) li.append(actionsView(chat, m, mine));
  if (mine) {
    const t = tickState(chat, m);
    li.append(ticksView(t.status, t.label));
  }
  return li;
}

function actionsView(chat, m, mine) {
  const box = el("div", { class: "actions" });
  const picker = el("div", { class: "picker", role: "group", "aria-label": "Pick a reaction", hidden: "" },
    ...REACTIONS.map((e) => el("button", {
      type: "button", "data-action": `pick-${e}`, "aria-label": `React with ${e}`,
      onclick: () => { picker.hidden = true; react(chat, m, e); },
    }, e)));
  const reactBtn = el("button", {
    type: "button", "data-action": "react", "aria-expanded": "false", "aria-label": "React to this message",
    onclick: () => {
      picker.hidden = !picker.hidden;
      reactBtn.setAttribute("aria-expanded", String(!picker.hidden));
      if (!picker.hidden) picker.querySelector("button").focus();
    },
  }, "React");
  picker.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") {
      picker.hidden = true;
      reactBtn.setAttribute("aria-expanded", "false");
      reactBtn.focus();
    }
  });
  box.append(reactBtn, picker);
  if (mine && m.kind === "text") {
    box.append(el("button", { type: "button", "data-action": "edit", onclick: () => startEdit(chat, m) }, "Edit"));
  }
  if (mine) {
    box.append(el("button", { type: "button", "data-action": "delete", onclick: () => askDelete(chat, m) }, "Delete"));
  }
  return box;
}

function outgoingView(o) {
  const li = el("li", { class: `msg mine outgoing${o.status === "failed" ? " failed" : ""}`, "data-client-id": o.clientId });
  li.append(el("div", { class: "meta" }, el("span", { class: "sender" }, "You")));
  const shown = o.body.length > 280 ? `${o.body.slice(0, 280)}… (${o.body.length} characters)` : o.body;
  li.append(el("p", { class: "body" }, shown));
  if (o.status === "failed") {
    const e = o.error || {};
    const wait = e.retryAfter ? ` Try again in ${Math.ceil(e.retryAfter)} s.` : "";
    li.append(el("p", { class: "refusal", role: "alert" },
      `Not sent: ${e.message || "refused"} (${e.code || "error"}).${wait} `,
      el("button", { type: "button", "data-action": "retry", onclick: () => retrySend(o) }, "Retry"),
      el("button", { type: "button", "data-action": "discard", onclick: () => discard(o) }, "Discard")));
  } else {
    li.append(ticksView("sending", "Sending"));
  }
  return li;
}

function attachmentView(a) {
  const fig = el("figure", { class: "attachment" });
  const isImage = /^image\//.test(a.contentType || "");
  const caption = el("figcaption", {},
    el("button", { type: "button", class: "link", "data-action": "download", onclick: () => download(a) },
      `Download ${a.fileName}`), ` (${fileSize(a.size)})`);
  if (isImage) {
    const img = el("img", { class: "preview", alt: a.fileName, "data-attachment-id": a.attachmentId });
    const status = el("span", { class: "hint preview-status" }, "Loading preview…");
    fig.append(img, status);
    blobUrl(a.attachmentId).then((url) => {
      img.src = url;
      status.remove();
    }).catch((e) => { status.textContent = `No preview: ${e.message}`; });
  } else {
    fig.append(el("span", { class: "file-icon", "aria-hidden": "true" }, "📎"));
  }
  fig.append(caption);
  return fig;
}

function blobUrl(attachmentId) {
  let p = S.blobs.get(attachmentId);
  if (!p) {
    p = (async () => {
      for (let i = 0; ; i++) {
        try {
          return URL.createObjectURL(await S.api.attachment(attachmentId));
        } catch (e) {
          // 409: still being checked; anything else is final.
          if (!(e instanceof ApiError) || e.status !== 409 || i >= 6) throw e;
          await new Promise((r) => setTimeout(r, 500 * 2 ** i));
        }
      }
    })();
    p.catch(() => S.blobs.delete(attachmentId));
    S.blobs.set(attachmentId, p);
  }
  return p;
}

async function download(a) {
  try {
    const url = await blobUrl(a.attachmentId);
    const link = el("a", { href: url, download: a.fileName, hidden: "" });
    document.body.append(link);
    link.click();
    link.remove();
  } catch (e) {
    banner("download", `Could not download ${a.fileName}: ${e.message}`, "error");
  }
}

// --- sending --------------------------------------------------------------------------
function send(ev) {
  ev?.preventDefault();
  const chat = S.chats.get(S.openId);
  const input = $("composer-input");
  const body = input.value;
  if (!chat || !body.trim()) return;
  const clientId = `c-${randomId(12)}`;
  const o = { clientId, chatId: chat.chatId, body, status: "sending", error: null };
  chat.outgoing.set(clientId, o);
  sendTracked({ type: "chat", id: clientId, chatId: chat.chatId, body }, { kind: "chat", chatId: chat.chatId });
  input.value = "";
  stopTyping();
  const log = $("log");
  $("messages").append(outgoingView(o));
  log.scrollTop = log.scrollHeight;
}

function retrySend(o) {
  const chat = S.chats.get(o.chatId);
  o.status = "sending";
  o.error = null;
  sendTracked({ type: "chat", id: o.clientId, chatId: o.chatId, body: o.body }, { kind: "chat", chatId: o.chatId });
  if (chat && S.openId === chat.chatId) renderMessages();
}

function discard(o) {
  S.chats.get(o.chatId)?.outgoing.delete(o.clientId);
  S.pending.delete(o.clientId);
  renderMessages();
  $("composer-input").focus();
}

function command(chat, fields) {
  const id = `k-${randomId(12)}`;
  sendTracked({ type: "command", id, ...fields }, { kind: "command", chatId: chat.chatId, ...fields });
}

function react(chat, m, emoji) {
  command(chat, { op: "react", messageId: m.messageId, emoji });
}

function startEdit(chat, m) {
  const li = document.getElementById(messageId(m));
  if (!li) return;
  const area = el("textarea", { id: `edit-${m.messageId}`, rows: "2" });
  area.value = m.body || "";
  const form = el("form", { class: "edit-form" },
    el("label", { for: area.id }, "Edit message"), area,
    el("button", { type: "submit", class: "primary", "data-action": "save" }, "Save"),
    el("button", { type: "button", "data-action": "cancel", onclick: () => updateMessage(chat, m) }, "Cancel"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const body = area.value;
    if (body.trim() && body !== m.body) command(chat, { op: "edit", messageId: m.messageId, body });
    updateMessage(chat, m);
    document.getElementById(messageId(m))?.querySelector('[data-action="edit"]')?.focus();
  });
  area.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") {
      updateMessage(chat, m);
      document.getElementById(messageId(m))?.querySelector('[data-action="edit"]')?.focus();
    } else if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
  li.querySelector(".body")?.replaceWith(form);
  area.focus();
}

function askDelete(chat, m) {
  const li = document.getElementById(messageId(m));
  const actions = li?.querySelector(".actions");
  if (!actions) return;
  const confirmBox = el("div", { class: "confirm", role: "group", "aria-label": "Confirm delete" },
    el("span", {}, "Delete this message for everyone? "),
    el("button", { type: "button", class: "danger", "data-action": "confirm-delete", onclick: () => {
      command(chat, { op: "delete", messageId: m.messageId });
      updateMessage(chat, m);
    } }, "Delete"),
    el("button", { type: "button", "data-action": "keep", onclick: () => {
      updateMessage(chat, m);
      document.getElementById(messageId(m))?.querySelector('[data-action="delete"]')?.focus();
    } }, "Keep"));
  actions.replaceWith(confirmBox);
  confirmBox.querySelector("button").focus();
}

// --- typing ---------------------------------------------------------------------------
function signal(to, payload) {
  S.conn?.send({ type: "signal", id: `g-${randomId(12)}`, to, payload });
}

function onComposerInput() {
  const chat = S.chats.get(S.openId);
  if (!chat) return;
  if (!$("composer-input").value.trim()) return stopTyping();
  const now = Date.now();
  const t = S.typingSent;
  if (t.chatId !== chat.chatId || now - t.at > TYPING_EVERY_MS) {
    for (const u of othersOf(chat)) signal(u, { typing: true, chatId: chat.chatId });
    t.at = now;
    t.chatId = chat.chatId;
  }
  clearTimeout(t.timer);
  t.timer = setTimeout(stopTyping, TYPING_IDLE_MS);
}

function stopTyping() {
  const t = S.typingSent;
  clearTimeout(t.timer);
  if (!t.chatId) return;
  const chat = S.chats.get(t.chatId);
  if (chat) for (const u of othersOf(chat)) signal(u, { typing: false, chatId: chat.chatId });
  t.chatId = null;
  t.at = 0;
}

// --- receipts -------------------------------------------------------------------------
/** The client's ACK (a `receipt` frame, cumulative per chat) for an item it received. The
 * server moves this member's pointers and tells the chat's other members (their ticks). */
function noteDelivered(chat, item) {
  const id = item.eventId || item.messageId;
  if (!chat.deliveredQueued || item.seq > chat.deliveredQueued.seq) chat.deliveredQueued = { seq: item.seq, id };
  queueReceipts();
}

function markRead(chat) {
  if (!chat || chat.chatId !== S.openId || document.hidden) return;
  let top = null;
  for (const it of chat.items.values()) if (!top || it.seq > top.seq) top = it;
  if (top && top.seq > chat.readSent && (!chat.readQueued || top.seq > chat.readQueued.seq)) {
    chat.readQueued = { seq: top.seq, id: top.eventId || top.messageId };
    queueReceipts();
  }
  if (chat.unreadCount) {
    chat.unreadCount = 0;
    renderChatList();
  }
}

function queueReceipts() {
  if (S.receiptTimer) return;
  S.receiptTimer = setTimeout(flushReceipts, 150);
}

function flushReceipts() {
  S.receiptTimer = null;
  if (!S.conn || S.conn.state !== "connected") return;
  for (const chat of S.chats.values()) {
    const d = chat.deliveredQueued, r = chat.readQueued;
    if (d && S.conn.send({ type: "receipt", messageIds: [d.id], status: "delivered" })) {
      chat.deliveredQueued = null;
      chat.deliveredSent = Math.max(chat.deliveredSent, d.seq);
    }
    if (r && S.conn.send({ type: "receipt", messageIds: [r.id], status: "read" })) {
      chat.readQueued = null;
      chat.readSent = Math.max(chat.readSent, r.seq);
      chat.deliveredSent = Math.max(chat.deliveredSent, r.seq);
    }
  }
}

/** Move another member's pointers forward (they only grow: events may arrive out of order
 * or after the chat list already had them); true when something moved. */
function movePeer(chat, userId, delivered, read) {
  if (userId === S.me) return false;
  const p = chat.peers.get(userId) || { delivered: 0, read: 0 };
  const next = { delivered: Math.max(p.delivered, delivered || 0), read: Math.max(p.read, read || 0) };
  if (next.delivered === p.delivered && next.read === p.read && chat.peers.has(userId)) return false;
  chat.peers.set(userId, next);
  return true;
}

/** A `receipt` system event: a member's pointers moved on the server. */
function onPeerReceipt(d) {
  const chat = S.chats.get(d.chatId);
  if (!chat || typeof d.userId !== "string") return;
  const delivered = Number.isInteger(d.deliveredSeq) ? d.deliveredSeq : 0;
  const read = Number.isInteger(d.readSeq) ? d.readSeq : 0;
  if (movePeer(chat, d.userId, delivered, read)) renderTicks(chat);
}

/** Redraw the ticks of my messages in the open chat where their state changed. */
function renderTicks(chat) {
  if (!chat || chat.chatId !== S.openId) return;
  for (const li of $("messages").querySelectorAll("li.msg.mine[data-seq]")) {
    const m = chat.byId.get(li.dataset.messageId);
    if (!m) continue;
    const t = tickState(chat, m);
    const box = li.querySelector(".ticks");
    if (box && (box.dataset.status !== t.status || box.getAttribute("aria-label") !== t.label)) {
      box.replaceWith(ticksView(t.status, t.label));
    }
  }
}

// --- frames from the server -----------------------------------------------------------
function onFrame(f) {
  switch (f.type) {
    case "message":
    case "command":
      return onLive(f);
    case "ack":
      return onAck(f);
    case "sync":
      return onSync(f);
    case "signal":
      return onSignal(f);
    case "system":
      return onSystem(f);
    case "error":
      return onError(f);
    default:
      return undefined;
  }
}

async function chatFor(chatId) {
  let chat = S.chats.get(chatId);
  if (!chat) {
    try { await refreshChats(); } catch { /* shown elsewhere */ }
    chat = S.chats.get(chatId);
  }
  return chat;
}

async function onLive(f) {
  const chat = await chatFor(f.chatId);
  if (!chat) return;
  const wasNew = f.type === "message" ? !chat.byId.has(f.messageId) : !chat.seen.has(f.eventId);
  const atBottom = nearBottom($("log"));
  if (chat.loaded && f.seq > chat.tail + 1) sendSync(chat);    // a hole: fill it from the store
  const changed = applyItems(chat, [f], { snapshot: false });
  noteDelivered(chat, f);
  const counted = chat.unreadUpto;
  chat.unreadUpto = Math.max(chat.unreadUpto, f.seq);
  if (wasNew && f.type === "message" && f.senderId !== S.me) {
    if (f.seq > counted && (chat.chatId !== S.openId || document.hidden)) chat.unreadCount += 1;
    chat.typing.delete(f.senderId);
  }
  for (const m of changed) updateMessage(chat, m);
  if (f.type === "message" && f.kind === "attachment" && f.attachment) {
    S.arrived.add(f.attachment.attachmentId);
    settleUpload(f.attachment.attachmentId);
  }
  if (chat.chatId === S.openId) {
    renderTyping();
    markRead(chat);
    if (atBottom) $("log").scrollTop = $("log").scrollHeight;
  }
  renderChatList();
}

function onSync(f) {
  const p = S.pending.get(f.id);
  S.pending.delete(f.id);
  const chat = S.chats.get(f.chatId || p?.chatId);
  if (!chat) return;
  const atBottom = nearBottom($("log"));
  const changed = applyItems(chat, f.messages || [], { snapshot: true });
  const top = (f.messages || []).at(-1);
  if (top) noteDelivered(chat, { seq: top.seq, eventId: top.eventId, messageId: top.messageId });
  for (const m of f.messages || []) {
    if (m.type !== "command" && m.senderId !== S.me && m.seq > chat.unreadUpto
        && (chat.chatId !== S.openId || document.hidden)) {
      chat.unreadCount += 1;
    }
    chat.unreadUpto = Math.max(chat.unreadUpto, m.seq);
  }
  if (chat.chatId === S.openId) {
    for (const m of changed) updateMessage(chat, m);
    markRead(chat);
    if (atBottom) $("log").scrollTop = $("log").scrollHeight;
  }
  if (f.hasMore) sendSync(chat);
  renderChatList();
}

async function onAck(f) {
  const p = S.pending.get(f.id);
  if (!p) return;
  S.pending.delete(f.id);
  const chat = S.chats.get(p.chatId);
  const ok = f.status === "accepted" || f.status === "duplicate";
  if (p.kind === "chat" && chat) {
    const o = chat.outgoing.get(f.id);
    if (ok) {
      chat.outgoing.delete(f.id);
      const m = {
        type: "message", messageId: f.messageId, chatId: chat.chatId, seq: f.seq, senderId: S.me,
        kind: "text", body: o?.body ?? "", createdAt: new Date().toISOString(),
      };
      document.querySelector(`li.outgoing[data-client-id="${CSS.escape(f.id)}"]`)?.remove();
      const changed = applyItems(chat, [m], { snapshot: false });
      for (const c of changed) updateMessage(chat, c);
      markRead(chat);
    } else if (o) {
      o.status = "failed";
      o.error = f.error || {};
      const old = document.querySelector(`li.outgoing[data-client-id="${CSS.escape(f.id)}"]`);
      old?.replaceWith(outgoingView(o));
    }
    renderChatList();
  } else if (p.kind === "command" && chat) {
    if (!ok) {
      const e = f.error || {};
      banner(`command-${f.id}`, `Could not ${p.op} the message: ${e.message || "refused"} (${e.code || "error"})`,
        "error");
      return;
    }
    // Our own command is not echoed to this socket: apply it here, then read the target's
    // state back (a reaction toggles, and only the server knows whether it was added).
    const cmd = { type: "command", op: p.op, messageId: p.messageId, eventId: f.messageId, seq: f.seq,
      chatId: chat.chatId, by: S.me, body: p.body, emoji: p.emoji, createdAt: new Date().toISOString() };
    const changed = p.op === "react" ? [] : applyItems(chat, [cmd], { snapshot: false });
    if (p.op === "react") {
      chat.items.set(cmd.seq, cmd);
      chat.seen.add(cmd.eventId);
      advanceTail(chat);
    }
    for (const c of changed) updateMessage(chat, c);
    const target = chat.byId.get(p.messageId);
    if (target) {
      try {
        const page = await S.api.messages(chat.chatId, target.seq - 1, 1);
        for (const c of applyItems(chat, page.messages, { snapshot: true })) updateMessage(chat, c);
      } catch { /* the next history read will have it */ }
    }
    renderChatList();
  } else if (p.kind === "attachment") {
    onAttachmentAck(f, p);
  }
}

function onSignal(f) {
  const payload = f.payload || {};
  if (typeof payload.typing === "boolean") {
    // chatId is ours; a bare {"typing": true} (README's example) means every chat shared with them.
    const chats = payload.chatId ? [S.chats.get(payload.chatId)] : [...S.chats.values()];
    for (const chat of chats) {
      if (!chat || !chat.members.includes(f.from)) continue;
      if (payload.typing) chat.typing.set(f.from, Date.now() + TYPING_SHOWN_MS);
      else chat.typing.delete(f.from);
    }
    renderTyping();
    setTimeout(renderTyping, TYPING_SHOWN_MS + 50);
  }
  return undefined;
}

function onSystem(f) {
  const d = f.data || {};
  switch (f.event) {
    case "receipt":
      onPeerReceipt(d);
      break;
    case "presence":
      S.presence.set(d.userId, { online: !!d.online, lastSeen: d.lastSeen });
      renderChatList();
      if (S.openId) renderConversationHead();
      break;
    case "credits_low":
      banner("credits", `You are sending fast: ${d.remaining ?? "few"} credits left before sending pauses.`, "warning",
        { timeoutMs: 10000 });
      break;
    case "credits_exhausted": {
      const until = Date.now() + (Number(d.retryAfter) || 1) * 1000;
      banner("credits", () => {
        const s = Math.max(0, Math.ceil((until - Date.now()) / 1000));
        return `Out of credits: sending is paused. Try again in ${s} s.`;
      }, "error", { until });
      break;
    }
    case "overload":
      banner("overload", `The server is busy (${d.type || "messages"} buffer full): what you send waits until it has room.`,
        "warning", { timeoutMs: 15000 });
      break;
    case "reconnect": {
      const s = Number(d.retryAfter) || 1;
      banner("reconnect", `The server asked to reconnect (${d.reason || "maintenance"}): reconnecting in ${s} s.`, "info");
      S.conn?.reconnectAfter(s);
      break;
    }
    case "attachment_rejected": {
      banner(`att-${d.attachmentId}`, `${d.fileName || "The file"} was refused: ${d.reason || d.code} (${d.code}).`, "error");
      for (const u of S.uploads.values()) {
        if (u.attachmentId === d.attachmentId) setUpload(u, { state: "failed", error: `${d.reason || d.code} (${d.code})` });
      }
      break;
    }
    default:
      break;
  }
}

function onError(f) {
  const p = f.id ? S.pending.get(f.id) : null;
  const text = `${f.message || "refused"} (${f.code || "error"})`;
  if (p) {
    S.pending.delete(f.id);
    const chat = S.chats.get(p.chatId);
    const o = chat?.outgoing.get(f.id);
    if (o) {
      o.status = "failed";
      o.error = { code: f.code, message: f.message };
      renderMessages();
      return;
    }
    if (p.kind === "attachment" && p.upload) return setUpload(p.upload, { state: "failed", error: text });
  }
  banner(`error-${f.id || randomId(4)}`, `The server refused a frame: ${text}`, "error");
}

// --- attachments ----------------------------------------------------------------------
function attachFile(file) {
  const chat = S.chats.get(S.openId);
  if (!chat || !file) return;
  const id = `a-${randomId(12)}`;
  const contentType = file.type || "application/octet-stream";
  const u = { id, chatId: chat.chatId, file, contentType, progress: 0, state: "requesting", error: null,
    attachmentId: null };
  S.uploads.set(id, u);
  renderUploads();
  sendTracked({ type: "attachment", id, chatId: chat.chatId, fileName: file.name, contentType, size: file.size },
    { kind: "attachment", chatId: chat.chatId, upload: u });
}

async function onAttachmentAck(f, p) {
  const u = p.upload;
  if (f.status === "rejected") {
    const e = f.error || {};
    return setUpload(u, { state: "failed", error: `${e.message || "refused"} (${e.code || "error"})` });
  }
  setUpload(u, { state: "uploading", attachmentId: f.attachmentId });
  try {
    const put = await putWithProgress(sameOriginUpload(f.uploadUrl), u.file, u.contentType,
      (x) => setUpload(u, { progress: x }));
    if (put.status < 200 || put.status >= 300) {
      const e = put.json?.error;
      throw new Error(e ? `${e.message} (${e.code})` : `storage answered HTTP ${put.status}`);
    }
    setUpload(u, { progress: 1, state: "checking" });
    // The embedded store reports the upload itself and answers with the outcome; other
    // storage is confirmed by the uploader (unless its webhook already did).
    let result = put.json?.results?.[0];
    for (let i = 0; !result && i < 8; i++) {
      try {
        result = await S.api.complete(f.attachmentId, f.uploadToken);
      } catch (e) {
        if (e instanceof ApiError && e.status === 409) {
          await new Promise((r) => setTimeout(r, 400 * 2 ** i));
          continue;
        }
        throw e;
      }
    }
    if (!result) throw new Error("the server is still checking the file");
    if (result.error || (result.state && result.state !== "ready")) {
      const e = result.error || {};
      throw new Error(`${e.message || result.state} (${e.code || result.state})`);
    }
    setUpload(u, { state: "done" });
    if (S.arrived.has(f.attachmentId)) settleUpload(f.attachmentId);
  } catch (e) {
    setUpload(u, { state: "failed", error: e.message });
  }
}

function settleUpload(attachmentId) {
  for (const [id, u] of S.uploads) {
    if (u.attachmentId && u.attachmentId === attachmentId && u.state === "done") {
      S.uploads.delete(id);
      renderUploads();
    }
  }
}

function setUpload(u, changes) {
  Object.assign(u, changes);
  const row = document.querySelector(`#uploads li[data-upload-id="${CSS.escape(u.id)}"]`);
  if (!row || changes.state) return renderUploads();
  const bar = row.querySelector("progress");
  if (bar) bar.value = Math.round(u.progress * 100);
  return undefined;
}

function renderUploads() {
  const rows = [...S.uploads.values()].filter((u) => u.chatId === S.openId).map((u) => {
    const label = {
      requesting: "Preparing", uploading: "Uploading", checking: "Checking", done: "Uploaded", failed: "Failed",
    }[u.state];
    const li = el("li", { "data-upload-id": u.id, "data-state": u.state, class: `upload ${u.state}` });
    li.append(el("span", {}, `${label}: ${u.file.name} (${fileSize(u.file.size)})`));
    if (u.state !== "failed") {
      li.append(el("progress", { max: "100", value: String(Math.round(u.progress * 100)),
        "aria-label": `Upload of ${u.file.name}` }));
    } else {
      li.append(el("span", { class: "refusal", role: "alert" }, ` ${u.error}`),
        el("button", { type: "button", onclick: () => { S.uploads.delete(u.id); renderUploads(); } }, "Dismiss"));
    }
    return li;
  });
  $("uploads").replaceChildren(...rows);
}

// --- banners --------------------------------------------------------------------------
const bannerTimers = new Map();

/** A notice at the top; `text` may be a function (re-read every second until `until`). */
function banner(key, text, level = "info", { timeoutMs = null, until = null } = {}) {
  dismiss(key);
  const msg = el("span", { class: "banner-text" });
  const box = el("div", { class: `banner ${level}`, "data-key": key, role: level === "error" ? "alert" : "status" },
    msg, el("button", { type: "button", class: "quiet", "aria-label": "Dismiss notice", onclick: () => dismiss(key) }, "×"));
  const render = () => { msg.textContent = typeof text === "function" ? text() : text; };
  render();
  $("banners").append(box);
  if (until) {
    const t = setInterval(() => {
      render();
      if (Date.now() >= until) dismiss(key);
    }, 1000);
    bannerTimers.set(key, () => clearInterval(t));
  } else if (timeoutMs) {
    const t = setTimeout(() => dismiss(key), timeoutMs);
    bannerTimers.set(key, () => clearTimeout(t));
  }
}

function dismiss(key) {
  bannerTimers.get(key)?.();
  bannerTimers.delete(key);
  $("banners").querySelector(`[data-key="${CSS.escape(key)}"]`)?.remove();
}

// --- keyboard -------------------------------------------------------------------------
function wireApp() {
  $("new-chat").addEventListener("submit", createChat);
  $("composer").addEventListener("submit", send);
  $("composer-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) send(ev);
  });
  $("composer-input").addEventListener("input", onComposerInput);
  $("attach").addEventListener("click", () => $("file-input").click());
  $("file-input").addEventListener("change", () => {
    const f = $("file-input").files[0];
    $("file-input").value = "";
    attachFile(f);
  });
  $("load-earlier").addEventListener("click", loadEarlier);
  // Skip to what matters now: the message box, else the chats, else the sign-in form.
  $("skip-link").addEventListener("click", (ev) => {
    const target = [$("composer-input"), $("chat-list").querySelector("button"), $("new-members"),
      document.querySelector("#signin-view input:not([hidden]), #signin-view textarea")]
      .find((n) => n && n.offsetParent !== null);
    if (!target) return;
    ev.preventDefault();
    target.focus();
  });
  // Arrow keys move between chats; Home/End to the first/last.
  $("chat-list").addEventListener("keydown", (ev) => {
    const buttons = [...$("chat-list").querySelectorAll("button.chat-item")];
    const i = buttons.indexOf(document.activeElement);
    if (i < 0) return;
    const to = { ArrowDown: i + 1, ArrowUp: i - 1, Home: 0, End: buttons.length - 1 }[ev.key];
    if (to === undefined) return;
    ev.preventDefault();
    buttons[Math.max(0, Math.min(buttons.length - 1, to))].focus();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && S.openId) markRead(S.chats.get(S.openId));
  });
}

async function boot() {
  wireSignin();
  wireApp();
  try {
    S.cfg = await loadConfig();
  } catch (e) {
    showSignin(`The server's sign-in settings could not be read (${e.message}): paste a token.`);
    return;
  }
  if (S.cfg.auth.mode === "oidc") {
    try {
      const s = await finishOidc(S.cfg.auth);
      if (s) return enter(s);
    } catch (e) {
      return showSignin(e.message);
    }
  }
  const s = currentSession();
  if (s) return enter(s);
  return showSignin();
}

boot();
