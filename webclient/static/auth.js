// Signing in: a dev token from the server, a pasted token, or OpenID Connect
// (authorization code + PKCE). The access token lives in sessionStorage (this tab only).

const KEY = "conveyor.session";
const PKCE_KEY = "conveyor.pkce";

export const appBase = new URL("./", location.href);      // …/app/
export const apiBase = new URL("../", appBase);           // where the API is (route prefix kept)

export function randomId(bytes = 16) {
  const a = crypto.getRandomValues(new Uint8Array(bytes));
  return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
}

function b64url(bytes) {
  let s = "";
  for (const b of new Uint8Array(bytes)) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** The claims of a JWT (not verified: the server does that). */
export function claimsOf(token) {
  const part = String(token).split(".")[1];
  if (!part) throw new Error("this is not a JWT (it needs three dot-separated parts)");
  const json = atob(part.replace(/-/g, "+").replace(/_/g, "/"));
  const bytes = Uint8Array.from(json, (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

export async function loadConfig() {
  const r = await fetch(new URL("config.json", appBase), { cache: "no-store" });
  if (!r.ok) throw new Error(`config.json: HTTP ${r.status}`);
  return r.json();
}

/** A session: {token, userId, exp, refreshToken?, via}. */
export function saveSession(token, via, extra = {}) {
  const c = claimsOf(token);
  if (!c.sub) throw new Error("the token has no subject (sub)");
  if (c.exp && c.exp * 1000 < Date.now()) throw new Error("the token has expired");
  const session = { token, userId: c.sub, exp: c.exp || null, via, ...extra };
  sessionStorage.setItem(KEY, JSON.stringify(session));
  return session;
}

export function currentSession() {
  try {
    const s = JSON.parse(sessionStorage.getItem(KEY) || "null");
    if (!s || !s.token) return null;
    if (s.exp && s.exp * 1000 < Date.now() && !s.refreshToken) return null;
    return s;
  } catch {
    return null;
  }
}

export function clearSession() {
  sessionStorage.removeItem(KEY);
}

async function errorText(r) {
  try {
    const body = await r.json();
    if (body && body.error) return `${body.error.message} (${body.error.code})`;
    if (body && body.error_description) return body.error_description;
  } catch { /* not JSON */ }
  return `HTTP ${r.status}`;
}

export async function devSignIn(userId) {
  const r = await fetch(new URL("dev-token", appBase), {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ userId }),
  });
  if (!r.ok) throw new Error(await errorText(r));
  const { token } = await r.json();
  return saveSession(token, "dev");
}

// --- OpenID Connect, authorization code flow with PKCE (RFC 7636) ----------------------
function redirectUri() {
  return appBase.href;
}

export async function startOidc(auth) {
  if (!crypto.subtle) throw new Error("single sign-on needs a secure page (https or localhost)");
  const verifier = b64url(crypto.getRandomValues(new Uint8Array(32)));
  const challenge = b64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  const state = randomId();
  sessionStorage.setItem(PKCE_KEY, JSON.stringify({ verifier, state }));
  const url = new URL(auth.authorizationEndpoint);
  url.search = new URLSearchParams({
    response_type: "code",
    client_id: auth.clientId,
    redirect_uri: redirectUri(),
    scope: auth.scope || "openid",
    state,
    code_challenge: challenge,
    code_challenge_method: "S256",
  }).toString();
  location.assign(url.href);
}

async function tokenRequest(auth, params) {
  const r = await fetch(auth.tokenEndpoint, {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({ client_id: auth.clientId, ...params }).toString(),
  });
  if (!r.ok) throw new Error(`the issuer refused: ${await errorText(r)}`);
  return r.json();
}

/** Finishes a redirect back from the issuer; null when this page load is not one. */
export async function finishOidc(auth) {
  const q = new URLSearchParams(location.search);
  if (!q.has("code") && !q.has("error")) return null;
  history.replaceState(null, "", appBase.pathname);
  const saved = JSON.parse(sessionStorage.getItem(PKCE_KEY) || "null");
  sessionStorage.removeItem(PKCE_KEY);
  if (q.has("error")) throw new Error(`sign-in failed: ${q.get("error_description") || q.get("error")}`);
  if (!saved || saved.state !== q.get("state")) throw new Error("sign-in failed: unexpected state");
  const got = await tokenRequest(auth, {
    grant_type: "authorization_code",
    code: q.get("code"),
    redirect_uri: redirectUri(),
    code_verifier: saved.verifier,
  });
  return saveSession(got.access_token, "oidc", { refreshToken: got.refresh_token || null });
}

/** A fresh access token from the refresh token (OIDC sessions). */
export async function refreshOidc(auth, session) {
  const got = await tokenRequest(auth, { grant_type: "refresh_token", refresh_token: session.refreshToken });
  return saveSession(got.access_token, "oidc", { refreshToken: got.refresh_token || session.refreshToken });
}
