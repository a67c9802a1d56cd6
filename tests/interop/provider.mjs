// An independent OAuth 2.0 / OpenID Connect server for refreshd's interop harness:
// oidc-provider (panva, OpenID Certified) configured like the strictest real providers.
//
// - one confidential client, client_secret_post, grants authorization_code + refresh_token;
// - refresh-token rotation on every use, and oidc-provider's own reuse detection: a rotated
//   (consumed) refresh token presented again revokes the whole grant;
// - short access tokens (seconds) and a fixed refresh-token lifetime (minutes) counted from
//   the first grant, announced as `refresh_expires_in` in every token answer;
// - state in a JSON file (written after every change, atomically), so a restart keeps every
//   grant, token and consumed-token mark;
// - /control/* on the same port: outage switch (503 on the token endpoint), counters.
//
// Usage: node provider.mjs [--port 0] [--state FILE] [--access-ttl 20] [--refresh-ttl 600]
//        [--short-refresh-ttl 60] [--redirect-uri URL]...
//        [--auth-method client_secret_post|client_secret_basic] [--pkce-required]
//        [--rotate 1|0] [--sliding] [--announce-refresh-expiry 1|0]
// The generic-profile set-ups (issue 18) use client_secret_basic, required PKCE, no announced
// refresh-token end, and either rotation with a fixed lifetime or no rotation with a sliding
// one (each refresh renews the token's end: --sliding).
// Logins whose name starts with "eol-" get --short-refresh-ttl: the end-of-life scenario.
// Prints one JSON line {"event":"listening","issuer":...} on stdout when ready, and its
// counters as one JSON line {"event":"counters",...} when it exits (SIGTERM/SIGINT or
// POST /control/shutdown).

import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import Provider from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: process.env.PROVIDER_PORT ?? '0' },
    state: { type: 'string', default: process.env.PROVIDER_STATE ?? 'provider-state.json' },
    'access-ttl': { type: 'string', default: process.env.ACCESS_TTL ?? '20' },
    'refresh-ttl': { type: 'string', default: process.env.REFRESH_TTL ?? '600' },
    'short-refresh-ttl': { type: 'string', default: process.env.SHORT_REFRESH_TTL ?? '60' },
    'client-id': { type: 'string', default: 'refreshd-interop' },
    'client-secret': { type: 'string', default: 'interop-client-secret-0123456789' },
    'redirect-uri': { type: 'string', multiple: true, default: [] },
    // Up to this long (random) between rotating a refresh token and sending the answer:
    // network latency, and the window in which a client that dies loses the rotation.
    'refresh-delay-ms': { type: 'string', default: process.env.REFRESH_DELAY_MS ?? '0' },
    // This fraction of refresh answers is never sent: the connection is cut after the
    // rotation (a proxy or network failure between the provider's commit and the client).
    'cut-rate': { type: 'string', default: process.env.CUT_RATE ?? '0' },
    'auth-method': { type: 'string', default: 'client_secret_post' },
    'pkce-required': { type: 'boolean', default: false },
    rotate: { type: 'string', default: '1' },
    sliding: { type: 'boolean', default: false },
    'announce-refresh-expiry': { type: 'string', default: '1' },
  },
});

const ACCESS_TTL = Number(args['access-ttl']);
const REFRESH_TTL = Number(args['refresh-ttl']);
const SHORT_REFRESH_TTL = Number(args['short-refresh-ttl']);
const STATE_FILE = path.resolve(args.state);
const REFRESH_DELAY_MS = Number(args['refresh-delay-ms']);
let CUT_RATE = Number(args['cut-rate']);
const ROTATE = args.rotate !== '0';
const ANNOUNCE = args['announce-refresh-expiry'] !== '0';

// ---------------------------------------------------------------------------------------
// File-backed adapter: one in-memory map, written whole to STATE_FILE (temp + rename) on a
// short debounce and on exit. Shape follows oidc-provider's memory adapter.

const now = () => Date.now();
let db = { entries: {}, grants: {}, counters: null, issued: {} };
if (fs.existsSync(STATE_FILE)) {
  db = JSON.parse(fs.readFileSync(STATE_FILE, 'utf8'));
}

const counters = db.counters ?? {
  refresh_requests: 0, // every refresh_token grant request reaching the token endpoint
  refresh_served: 0, // refresh answers with new tokens (HTTP 200)
  refresh_unavailable: 0, // answered 503 by the outage switch
  reuse_revocations: 0, // grants revoked because a used refresh token came back
  invalid_grant: 0, // every invalid_grant answer (reuse, expired, revoked...)
  code_exchanges: 0, // authorization_code grants answered with tokens
  answers_cut: 0, // rotations whose answer was cut off by --cut-rate
  grants_revoked: 0, // every grant revocation (reuse detection, or the revocation endpoint)
  restarts: 0,
};
db.counters = counters;
if (fs.existsSync(STATE_FILE)) counters.restarts += 1;
// Refresh tokens handed out, by value: {grant, at, presented}. A rotation answer whose new
// refresh token is never presented afterwards (and is not its grant's latest) is an
// answer the client lost: served but never committed.
const issued = db.issued ?? {};
db.issued = issued;
db.revokedForReuse ??= {};
// Timestamps (ms) of refresh requests, to measure the client's request rate.
let refreshTimes = [];

let dirty = false;
let flushTimer = null;
function flushNow() {
  if (flushTimer) {
    clearTimeout(flushTimer);
    flushTimer = null;
  }
  if (!dirty) return;
  dirty = false;
  const t = now();
  for (const [k, e] of Object.entries(db.entries)) {
    if (e.exp !== null && e.exp <= t) delete db.entries[k];
  }
  const tmp = `${STATE_FILE}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify(db));
  fs.renameSync(tmp, STATE_FILE);
}
function changed() {
  dirty = true;
  if (!flushTimer) flushTimer = setTimeout(flushNow, 1000);
}

const grantable = new Set(['AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode',
  'BackchannelAuthenticationRequest']);

class FileAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  get(key) {
    const e = db.entries[key];
    if (!e) return undefined;
    if (e.exp !== null && e.exp <= now()) {
      delete db.entries[key];
      changed();
      return undefined;
    }
    return e;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    db.entries[key] = { payload, exp: typeof expiresIn === 'number' ? now() + expiresIn * 1000 : null };
    if (this.model === 'Session') db.entries[`sessionUid:${payload.uid}`] = { payload: id, exp: db.entries[key].exp };
    if (grantable.has(this.model) && payload.grantId) {
      (db.grants[payload.grantId] ??= []).push(key);
    }
    changed();
  }

  async find(id) {
    return this.get(this.key(id))?.payload;
  }

  async findByUid(uid) {
    const id = this.get(`sessionUid:${uid}`)?.payload;
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode() {
    return undefined;
  }

  async consume(id) {
    const e = this.get(this.key(id));
    if (e) e.payload.consumed = Math.floor(now() / 1000);
    changed();
  }

  async destroy(id) {
    delete db.entries[this.key(id)];
    changed();
  }

  async revokeByGrantId(grantId) {
    for (const key of db.grants[grantId] ?? []) delete db.entries[key];
    delete db.grants[grantId];
    changed();
  }
}

// ---------------------------------------------------------------------------------------

// A restart keeps its port (refreshd's config names it) unless told otherwise.
const PORT = Number(args.port) || db.port || 0;
const { default: http } = await import('node:http');
const server = http.createServer();
await new Promise((resolve) => server.listen(PORT, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;
db.port = server.address().port;

const refreshTtlFor = (accountId) => (String(accountId).startsWith('eol-') ? SHORT_REFRESH_TTL : REFRESH_TTL);

const configuration = {
  adapter: FileAdapter,
  clients: [{
    client_id: args['client-id'],
    client_secret: args['client-secret'],
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: args['redirect-uri'],
    token_endpoint_auth_method: args['auth-method'],
  }],
  // Keys are fixed so tokens and sessions stay valid across a restart.
  cookies: { keys: ['interop-cookie-key-not-a-secret'] },
  jwks: db.jwks ?? undefined,
  findAccount: async (_ctx, id) => ({ accountId: id, claims: async () => ({ sub: id }) }),
  features: {
    devInteractions: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
  },
  pkce: { required: () => args['pkce-required'] },
  rotateRefreshToken: ROTATE,
  ttl: {
    AccessToken: ACCESS_TTL,
    AuthorizationCode: 60,
    IdToken: 3600,
    Interaction: 600,
    Session: 86400,
    Grant: 86400,
    // Fixed from the first grant: a rotated token keeps the remaining lifetime.
    RefreshToken: (ctx, token) => {
      const rotated = ctx?.oidc?.entities?.RotatedRefreshToken;
      if (rotated) return rotated.remainingTTL;
      return refreshTtlFor(token.accountId);
    },
  },
};

if (!db.jwks) {
  // Sign id_tokens with one RS256 key kept in the state file.
  const { generateKeyPair, exportJWK } = await import('jose');
  const { privateKey } = await generateKeyPair('RS256', { extractable: true });
  db.jwks = { keys: [{ ...(await exportJWK(privateKey)), kid: 'interop', use: 'sig', alg: 'RS256' }] };
  configuration.jwks = db.jwks;
  changed();
}

const provider = new Provider(issuer, configuration);
provider.on('server_error', (_ctx, err) => console.error('provider server_error', err));
// The answer only says "grant request is invalid"; the detail names reuse, and oidc-provider
// has revoked the grant (every token of it) before answering.
provider.on('grant.error', (ctx, err) => {
  if (err.error_detail === 'refresh token already used') {
    counters.reuse_revocations += 1;
    const grant = ctx.oidc?.entities?.RefreshToken?.grantId;
    if (grant) db.revokedForReuse[grant] = true;
    console.error(`reuse detected: grant revoked (${new Date().toISOString()})`);
  }
});
provider.on('grant.revoked', () => {
  counters.grants_revoked += 1;
});

let outage = false;

// Control routes, the outage switch, and request accounting around the token endpoint.
provider.use(async (ctx, next) => {
  if (ctx.path.startsWith('/control/')) {
    return control(ctx);
  }
  if (ctx.path !== '/token' || ctx.method !== 'POST') {
    return next();
  }
  // Peek at the form body without consuming it for oidc-provider.
  const raw = await readBody(ctx.req);
  const params = new URLSearchParams(raw);
  const grantType = params.get('grant_type');
  if (grantType === 'refresh_token') {
    counters.refresh_requests += 1;
    refreshTimes.push(now());
    if (refreshTimes.length > 200000) refreshTimes = refreshTimes.slice(-100000);
    const presented = issued[params.get('refresh_token')];
    if (presented) presented.presented = true;
  }
  if (outage) {
    if (grantType === 'refresh_token') counters.refresh_unavailable += 1;
    ctx.status = 503;
    ctx.set('Retry-After', '1');
    ctx.type = 'text/plain';
    ctx.body = 'Service Unavailable';
    return undefined;
  }
  await next();
  if (ctx.status === 200 && ctx.body && typeof ctx.body === 'object') {
    const rt = ctx.oidc?.entities?.RefreshToken;
    if (rt && grantType === 'refresh_token' && !ROTATE && args.sliding) {
      // Sliding: the presented (kept) token lives REFRESH_TTL from this refresh on.
      const e = db.entries[`RefreshToken:${rt.jti}`];
      if (e) {
        e.payload.exp = Math.floor(now() / 1000) + refreshTtlFor(rt.accountId);
        e.exp = e.payload.exp * 1000;
        changed();
      }
    }
    if (rt && ctx.body.refresh_token) {
      // Announce the refresh token's end, as TikTok or LinkedIn do.
      if (ANNOUNCE) ctx.body.refresh_expires_in = Math.max(0, rt.remainingTTL);
      issued[ctx.body.refresh_token] = { grant: rt.grantId, at: now(), presented: false };
      changed();
    }
    if (grantType === 'refresh_token') {
      counters.refresh_served += 1;
      if (REFRESH_DELAY_MS > 0) await new Promise((r) => setTimeout(r, Math.random() * REFRESH_DELAY_MS));
      if (Math.random() < CUT_RATE && !ctx.get('x-interop-verify')) {
        counters.answers_cut += 1;
        ctx.req.socket.destroy();
        return undefined;
      }
    }
    if (grantType === 'authorization_code') counters.code_exchanges += 1;
  } else if (ctx.body?.error === 'invalid_grant') {
    counters.invalid_grant += 1;
    changed();
  }
  return undefined;
});

// Reads the form body; oidc-provider then takes the already read body from req.body.
function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      req.body = Buffer.concat(chunks).toString('utf8');
      resolve(req.body);
    });
    req.on('error', reject);
  });
}

function lostAnswers() {
  // Per grant, every issued refresh token except the latest one must have been presented;
  // the latest one too when the grant was revoked for reuse (the old one came back instead).
  const latest = {};
  for (const [value, i] of Object.entries(issued)) {
    if (!latest[i.grant] || latest[i.grant].at < i.at) latest[i.grant] = { value, at: i.at };
  }
  let lost = 0;
  for (const [value, i] of Object.entries(issued)) {
    if (!i.presented && (latest[i.grant].value !== value || db.revokedForReuse[i.grant])) lost += 1;
  }
  return lost;
}

function snapshot() {
  return { ...counters, outage, lost_answers: lostAnswers(), issuer };
}

async function control(ctx) {
  const q = ctx.query;
  if (ctx.path === '/control/stats') {
    ctx.body = snapshot();
  } else if (ctx.path === '/control/outage' && ctx.method === 'POST') {
    outage = q.on === '1' || q.on === 'true';
    ctx.body = { outage };
  } else if (ctx.path === '/control/cut' && ctx.method === 'POST') {
    CUT_RATE = Number(q.rate ?? 0);
    ctx.body = { cut_rate: CUT_RATE };
  } else if (ctx.path === '/control/refresh-times') {
    const since = Number(q.since ?? 0);
    ctx.body = refreshTimes.filter((t) => t >= since);
  } else if (ctx.path === '/control/shutdown' && ctx.method === 'POST') {
    ctx.body = snapshot();
    setTimeout(() => shutdown(), 10);
  } else {
    ctx.status = 404;
    ctx.body = { error: 'unknown control route' };
  }
}

function shutdown() {
  dirty = true;
  flushNow();
  console.log(JSON.stringify({ event: 'counters', ...snapshot() }));
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

server.on('request', provider.callback());
console.log(JSON.stringify({ event: 'listening', issuer, state: STATE_FILE }));
