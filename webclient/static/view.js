// Small DOM helpers. Text goes in as text nodes only (never as HTML).

/** el("button", {type: "button", onclick: fn, "aria-label": "…"}, "text", child, null) */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function shortTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  const today = new Date().toDateString() === d.toDateString();
  return today
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

export function fileSize(n) {
  if (!Number.isFinite(n)) return "";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

export function nearBottom(node) {
  return node.scrollHeight - node.scrollTop - node.clientHeight < 80;
}

const TICKS = { sending: "🕓", sent: "✓", delivered: "✓✓", read: "✓✓" };

/** Delivery state of one of your messages: sending, sent (stored), delivered, read. */
export function ticksView(status, label) {
  return el("span", { class: "ticks", "data-status": status, role: "img", "aria-label": label, title: label },
    TICKS[status] || "");
}
