// refreshd against oidc-provider: the interop and chaos harness (issue 7).
//
// Each scenario gets its own oidc-provider (provider.mjs), its own SQLite store and its own
// refreshd process(es). Accounts are connected through refreshd's web connect flow, the
// consent step scripted over HTTP against oidc-provider's dev interaction pages. Each
// scenario ends by verifying every account with the provider itself: refreshd is stopped,
// and the refresh token refreshd stored is presented to the provider, which must accept it
// (and name the same user in its id_token) unless refreshd flagged the account for a
// reason the scenario allows.
//
// Usage: node harness.mjs [--form short|long] [--only steady,crash,...] [--out FILE]
//        [--bin PATH] [--keep DIR]
// Env: INTEROP_FORM, REFRESHD_BIN, INTEROP_OUT, INTEROP_ONLY, INTEROP_KEEP.
// Exit code 0 when every scenario met its conditions, 1 otherwise.

import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';

const HERE = path.dirname(new URL(import.meta.url).pathname);
const { values: args } = parseArgs({
  options: {
    form: { type: 'string', default: process.env.INTEROP_FORM ?? 'short' },
    only: { type: 'string', default: process.env.INTEROP_ONLY ?? '' },
    out: { type: 'string', default: process.env.INTEROP_OUT ?? '' },
    bin: { type: 'string', default: process.env.REFRESHD_BIN ?? path.join(HERE, '../../target/debug/refreshd') },
    keep: { type: 'string', default: process.env.INTEROP_KEEP ?? '' },
    serial: { type: 'boolean', default: false },
  },
});

const LONG = args.form === 'long';
const BIN = path.resolve(args.bin);
if (!fs.existsSync(BIN)) {
  console.error(`refreshd binary not found at ${BIN}: build it (cargo build) or pass --bin`);
  process.exit(2);
}
try {
  execFileSync('sqlite3', ['-version'], { stdio: 'ignore' });
} catch {
  console.error('sqlite3 (the command-line shell) is needed to read the store: apt-get install sqlite3');
  process.exit(2);
}
const ROOT = args.keep ? path.resolve(args.keep) : fs.mkdtempSync(path.join(os.tmpdir(), 'refreshd-interop-'));
fs.mkdirSync(ROOT, { recursive: true });

const CLIENT_ID = 'refreshd-interop';
const CLIENT_SECRET = 'interop-client-secret-0123456789';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const nowS = () => Math.floor(Date.now() / 1000);
const log = (...a) => console.error(`[${new Date().toISOString().slice(11, 19)}]`, ...a);

// ----------------------------------------------------------------------------- processes

async function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

// Every process the harness starts, killed at its exit: a scenario that fails midway (a
// provider not up in time, a connect that failed) left its provider and daemons running,
// loading the machine for the next run.
const children = new Set();
// 'exit' covers every way out: the normal end, process.exit, an uncaught error.
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});
function track(proc) {
  children.add(proc);
  proc.on('exit', () => children.delete(proc));
  return proc;
}

function waitForLine(child, pred, what, timeoutMs = 20000) {
  return new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), timeoutMs);
    const onData = (d) => {
      buf += d.toString();
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        let v;
        try { v = JSON.parse(line); } catch { continue; }
        if (pred(v)) {
          clearTimeout(timer);
          child.stdout.off('data', onData);
          resolve(v);
          return;
        }
      }
    };
    child.stdout.on('data', onData);
    child.on('exit', (code) => reject(new Error(`${what}: process exited with ${code}`)));
  });
}

class OidcProvider {
  constructor(dir, opts) {
    this.dir = dir;
    this.opts = opts;
    this.state = path.join(dir, 'provider-state.json');
    this.logFile = path.join(dir, 'provider.log');
  }

  async start() {
    const a = [path.join(HERE, 'provider.mjs'), '--state', this.state,
      '--access-ttl', String(this.opts.accessTtl), '--refresh-ttl', String(this.opts.refreshTtl),
      '--short-refresh-ttl', String(this.opts.shortRefreshTtl ?? 60),
      '--refresh-delay-ms', String(this.opts.refreshDelayMs ?? 0),
      '--cut-rate', String(this.opts.cutRate ?? 0),
      '--client-id', CLIENT_ID, '--client-secret', this.opts.clientSecret ?? CLIENT_SECRET];
    for (const [k, v] of Object.entries(this.opts.extraArgs ?? {})) a.push(`--${k}`, String(v));
    for (const f of this.opts.flags ?? []) a.push(`--${f}`);
    for (const u of this.opts.redirectUris) a.push('--redirect-uri', u);
    if (this.port) a.push('--port', String(this.port));
    const err = fs.openSync(this.logFile, 'a');
    this.proc = track(spawn(process.execPath, a, { cwd: HERE, stdio: ['ignore', 'pipe', err] }));
    const ready = await waitForLine(this.proc, (v) => v.event === 'listening', 'oidc-provider start');
    this.issuer = ready.issuer;
    this.port = Number(new URL(ready.issuer).port);
    this.proc.stdout.on('data', (d) => {
      for (const line of d.toString().split('\n')) {
        try {
          const v = JSON.parse(line);
          if (v.event === 'counters') this.final = v;
        } catch { /* not a counters line */ }
      }
    });
    return this;
  }

  async control(route, method = 'GET') {
    const r = await fetch(`${this.issuer}/control/${route}`, { method });
    return r.json();
  }

  stats() { return this.control('stats'); }

  outage(on) { return this.control(`outage?on=${on ? 1 : 0}`, 'POST'); }

  cutRate(rate) { return this.control(`cut?rate=${rate}`, 'POST'); }

  async stop() {
    const exited = new Promise((r) => this.proc.on('exit', r));
    this.proc.kill('SIGTERM');
    await exited;
    if (this.final) {
      const f = this.final;
      log(`${path.basename(this.dir)}: oidc-provider at exit: ${f.refresh_served} refreshes served, `
        + `${f.reuse_revocations} grants revoked for reuse, ${f.refresh_unavailable} answered 503`);
    }
    return this.final;
  }

  async restart() {
    await this.stop();
    await this.start();
  }
}

function refreshdConfig(sc, provider, listenPort) {
  const o = sc.refreshd;
  return `
[store]
path = ${JSON.stringify(path.join(sc.dir, 'refreshd.db'))}
lease = "${o.lease ?? '15s'}"
busy_timeout = "5s"
create = true

[refresh]
lead = "10m"
lead_fraction = 0.1
jitter = "${o.jitter ?? '2s'}"
min_interval = "2s"
concurrency = ${o.concurrency ?? 16}
backoff_base = "${o.backoffBase ?? '1s'}"
backoff_max = "${o.backoffMax ?? '8s'}"
request_timeout = "5s"
connect_timeout = "2s"
read_timeout = "4s"
max_idle = "2s"

[reauth]
window = "${o.reauthWindow ?? '60s'}"
sweep_cron = "*/2 * * * * *"

[log]
format = "json"
level = "info"

[shutdown]
grace = "10s"

[server]
listen = "127.0.0.1:${listenPort}"
stall_after = "1m"

[connect]
enabled = true
state_ttl = "5m"
success_url = "http://127.0.0.1/connected"
failure_url = "http://127.0.0.1/connect-failed"
# Both redirects are signed (the harness reads account_id only); required with the URLs.
redirect_secret = "interop-redirect-signing-key-0123456789"

[providers.interop]
kind = "generic"
client_id = "${CLIENT_ID}"
client_secret = ${JSON.stringify(sc.clientSecret ?? CLIENT_SECRET)}
authorize_url = "${provider.issuer}/auth"
token_url = "${provider.issuer}/token"
redirect_uri = "http://127.0.0.1:${sc.connectPort}/connect/interop/callback"
scopes = ["openid", "offline_access"]
${o.providerKeys ?? `client_auth = "body"
client_id_param = "client_id"
client_secret_param = "client_secret"
scope_separator = " "
authorize_params = { prompt = "consent" }
rotation = "always"
refresh_ttl = "fixed"
refresh_expires_in_field = "refresh_expires_in"`}
rate_limit = ${o.rateLimit ?? 6000}
burst = ${o.burst ?? 200}
`;
}

class Refreshd {
  constructor(sc, name, port) {
    this.sc = sc;
    this.name = name;
    this.port = port;
    this.logFile = path.join(sc.dir, `refreshd-${name}.log`);
    this.config = path.join(sc.dir, `refreshd-${name}.toml`);
    fs.writeFileSync(this.config, refreshdConfig(sc, sc.provider, port), { mode: 0o600 });
    this.starts = 0;
  }

  async start() {
    const err = fs.openSync(this.logFile, 'a');
    // refreshd reads every REFRESHD_* variable as a config key: REFRESHD_BIN is ours.
    const { REFRESHD_BIN: _ours, ...env } = process.env;
    this.proc = track(spawn(BIN, ['--config', this.config, 'run'], { stdio: ['ignore', 'ignore', err], env }));
    fs.closeSync(err);
    this.starts += 1;
    this.exited = new Promise((r) => this.proc.on('exit', (code, sig) => r({ code, sig })));
    const deadline = Date.now() + 20000;
    for (;;) {
      try {
        const r = await fetch(`http://127.0.0.1:${this.port}/readyz`);
        if (r.status === 200) return this;
      } catch { /* not listening yet */ }
      if (Date.now() > deadline) throw new Error(`refreshd ${this.name} not ready: see ${this.logFile}`);
      await sleep(50);
    }
  }

  async stop() {
    this.proc.kill('SIGTERM');
    const { code } = await this.exited;
    if (code !== 0) throw new Error(`refreshd ${this.name} exited with ${code}: see ${this.logFile}`);
  }

  async kill() {
    this.proc.kill('SIGKILL');
    await this.exited;
  }

  events() {
    const out = [];
    for (const line of fs.readFileSync(this.logFile, 'utf8').split('\n')) {
      if (!line.startsWith('{')) continue;
      try { out.push(JSON.parse(line)); } catch { /* a line cut by SIGKILL */ }
    }
    return out;
  }
}

// ----------------------------------------------------------------------------- connect

class CookieJar {
  constructor() { this.map = new Map(); }

  take(res) {
    for (const c of res.headers.getSetCookie()) {
      const [pair] = c.split(';');
      const i = pair.indexOf('=');
      this.map.set(pair.slice(0, i).trim(), pair.slice(i + 1));
    }
  }

  header() { return [...this.map].map(([k, v]) => `${k}=${v}`).join('; '); }
}

// One user's whole web connect: refreshd start -> provider login -> consent -> refreshd
// callback. Returns refreshd's account id.
async function connectAccount(sc, login) {
  const jar = new CookieJar();
  const get = async (url) => {
    const r = await fetch(url, { redirect: 'manual', headers: { cookie: jar.header() } });
    jar.take(r);
    return r;
  };
  const post = async (url, form) => {
    const r = await fetch(url, {
      method: 'POST',
      redirect: 'manual',
      headers: { cookie: jar.header(), 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams(form).toString(),
    });
    jar.take(r);
    return r;
  };
  let r = await get(`http://127.0.0.1:${sc.connectPort}/connect/interop/start?label=${encodeURIComponent(login)}`);
  let location = r.headers.get('location');
  for (let step = 0; step < 12; step += 1) {
    if (!location) throw new Error(`connect ${login}: no redirect at step ${step} (HTTP ${r.status}): ${await r.text()}`);
    const url = new URL(location, sc.provider.issuer);
    if (url.hostname === '127.0.0.1' && url.port === '' && url.pathname === '/connected') {
      return Number(url.searchParams.get('account_id'));
    }
    if (url.pathname === '/connect-failed') throw new Error(`connect ${login}: refreshd failed: ${url.search}`);
    const m = url.pathname.match(/^\/interaction\/([^/]+)$/);
    if (m) {
      const page = await (await get(url.href)).text();
      const prompt = page.includes('name="password"') ? 'login' : 'consent';
      const form = prompt === 'login' ? { prompt, login, password: 'any' } : { prompt };
      r = await post(url.href, form);
    } else {
      r = await get(url.href);
    }
    location = r.headers.get('location');
  }
  throw new Error(`connect ${login}: too many redirects`);
}

async function connectAll(sc, logins) {
  const ids = [];
  let next = 0;
  const worker = async () => {
    while (next < logins.length) {
      const login = logins[next];
      next += 1;
      ids.push(await connectAccount(sc, login));
    }
  };
  await Promise.all(Array.from({ length: 8 }, worker));
  return ids;
}

// ----------------------------------------------------------------------------- store + checks

function sql(sc, query) {
  const out = execFileSync('sqlite3', ['-json', '-cmd', '.timeout 5000', path.join(sc.dir, 'refreshd.db'), query]).toString();
  return out.trim() ? JSON.parse(out) : [];
}

function accounts(sc) {
  return sql(sc, 'SELECT id, subject, label, refresh_token, status, reauth_reason, last_error, refresh_expires_at, lease_owner, lease_expires_at FROM accounts ORDER BY id');
}

// The client's credentials as the provider wants them: in the body, or HTTP Basic with each
// part form-urlencoded first (RFC 6749 2.3.1).
function clientAuth(sc) {
  const secret = sc.clientSecret ?? CLIENT_SECRET;
  if (!sc.basic) return { headers: {}, params: { client_id: CLIENT_ID, client_secret: secret } };
  const enc = (v) => new URLSearchParams({ v }).toString().slice(2);
  const basic = Buffer.from(`${enc(CLIENT_ID)}:${enc(secret)}`).toString('base64');
  return { headers: { authorization: `Basic ${basic}` }, params: {} };
}

// The provider's own view of each stored refresh token's end (token introspection).
async function serverExpiries(sc, rows) {
  const out = new Map();
  for (const a of rows) {
    const r = await fetch(`${sc.provider.issuer}/token/introspection`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded', ...clientAuth(sc).headers },
      body: new URLSearchParams({ token: a.refresh_token, ...clientAuth(sc).params }).toString(),
    });
    const body = await r.json();
    out.set(a.id, body.active ? body.exp : null);
  }
  return out;
}

// Presents each stored refresh token to the provider (refreshd is stopped). Returns the
// ids whose token the provider refused or that came back naming another user.
async function verifyWithProvider(sc, rows) {
  const failed = [];
  for (const a of rows) {
    const r = await fetch(`${sc.provider.issuer}/token`, {
      method: 'POST',
      // Never cut by the provider's chaos: this is the verdict, not the test.
      headers: { 'content-type': 'application/x-www-form-urlencoded', 'x-interop-verify': '1', ...clientAuth(sc).headers },
      body: new URLSearchParams({
        grant_type: 'refresh_token', refresh_token: a.refresh_token, ...clientAuth(sc).params,
      }).toString(),
    });
    const body = await r.json();
    let ok = r.status === 200 && typeof body.access_token === 'string';
    if (ok && body.id_token) {
      const claims = JSON.parse(Buffer.from(body.id_token.split('.')[1], 'base64url').toString());
      ok = claims.sub === a.subject;
    }
    if (!ok) failed.push({ id: a.id, status: a.status, error: body.error_description ?? body.error ?? r.status });
  }
  return failed;
}

// Schedule lateness from refreshd's own log: each `refresh` event names the next planned
// refresh; the account's next attempt started (its log time minus its duration) that late.
// Give the events of every process sharing the store: another one may refresh it next.
function maxLateness(unsorted) {
  const events = [...unsorted].sort((x, y) => Date.parse(x.timestamp) - Date.parse(y.timestamp));
  const planned = new Map();
  let max = 0;
  for (const e of events) {
    const f = e.fields ?? e;
    if (f.event !== 'refresh' || f.account === undefined) continue;
    const t = Date.parse(e.timestamp ?? f.timestamp);
    const started = t - (Number(f.duration_ms) || 0);
    const p = planned.get(f.account);
    if (p !== undefined) max = Math.max(max, (started - p) / 1000);
    const next = f.next_refresh_at ?? f.retry_at;
    if (next) planned.set(f.account, Date.parse(next));
    else planned.delete(f.account);
  }
  return Math.round(max * 10) / 10;
}

function refreshesRotated(events) {
  return events.filter((e) => (e.fields ?? e).event === 'refresh' && (e.fields ?? e).outcome === 'rotated').length;
}

// ----------------------------------------------------------------------------- scenarios

async function setUp(name, opts) {
  const dir = path.join(ROOT, name);
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir, { recursive: true });
  const sc = {
    name, dir, refreshd: opts.refreshd ?? {}, connectPort: await freePort(), clientSecret: opts.clientSecret, basic: opts.basic,
  };
  sc.provider = await new OidcProvider(dir, {
    clientSecret: opts.clientSecret,
    extraArgs: opts.providerArgs,
    flags: opts.providerFlags,
    accessTtl: opts.accessTtl,
    refreshTtl: opts.refreshTtl ?? 3600,
    shortRefreshTtl: opts.shortRefreshTtl,
    refreshDelayMs: opts.refreshDelayMs ?? 0,
    cutRate: opts.cutRate ?? 0,
    redirectUris: [`http://127.0.0.1:${sc.connectPort}/connect/interop/callback`],
  }).start();
  sc.main = new Refreshd(sc, 'a', sc.connectPort);
  await sc.main.start();
  const t0 = Date.now();
  sc.ids = await connectAll(sc, opts.logins);
  log(`${name}: connected ${sc.ids.length} accounts in ${((Date.now() - t0) / 1000).toFixed(1)}s`);
  return sc;
}

function row(sc, extra) {
  return {
    scenario: sc.name,
    accounts: sc.ids.length,
    refreshes: extra.refreshes,
    reuse_revocations: extra.reuse,
    flagged: extra.flagged,
    lost: extra.lost,
    max_lateness_s: extra.lateness,
    ok: extra.ok,
    notes: extra.notes,
    details: extra.details,
  };
}

// Accounts not working at the provider and not flagged for an allowed reason.
function lostAccounts(rows, failed, allowed) {
  const failedIds = new Set(failed.map((f) => f.id));
  return rows.filter((a) => {
    const flaggedOk = a.status !== 'active' && allowed(a);
    if (flaggedOk) return false;
    return failedIds.has(a.id) || a.status !== 'active';
  });
}

const logins = (prefix, n) => Array.from({ length: n }, (_, i) => `${prefix}-${String(i + 1).padStart(4, '0')}`);

async function steady() {
  const n = LONG ? 200 : 40;
  const seconds = LONG ? 600 : 60;
  const sc = await setUp('steady', { accessTtl: LONG ? 30 : 12, logins: logins('steady', n) });
  await sleep(seconds * 1000);
  await sc.main.stop();
  const rows = accounts(sc);
  const stats = await sc.provider.stats();
  const failed = await verifyWithProvider(sc, rows);
  const lost = lostAccounts(rows, failed, () => false);
  const events = sc.main.events();
  const flagged = rows.filter((a) => a.status !== 'active').length;
  const refreshes = refreshesRotated(events);
  const cycles = refreshes / n;
  await sc.provider.stop();
  return row(sc, {
    refreshes,
    reuse: stats.reuse_revocations,
    flagged,
    lost: lost.length,
    lateness: maxLateness(events),
    ok: stats.reuse_revocations === 0 && flagged === 0 && lost.length === 0 && cycles >= 3,
    notes: `${cycles.toFixed(1)} cycles per account in ${seconds}s`,
    details: { provider: stats, failed, lost },
  });
}

async function replicas() {
  const n = LONG ? 200 : 40;
  const seconds = LONG ? 300 : 45;
  const sc = await setUp('replicas', { accessTtl: LONG ? 20 : 10, logins: logins('replica', n) });
  const others = [new Refreshd(sc, 'b', await freePort()), new Refreshd(sc, 'c', await freePort())];
  for (const r of others) await r.start();
  await sleep(seconds * 1000);
  for (const r of [sc.main, ...others]) await r.stop();
  const rows = accounts(sc);
  const stats = await sc.provider.stats();
  const failed = await verifyWithProvider(sc, rows);
  const lost = lostAccounts(rows, failed, () => false);
  const all = [sc.main, ...others].map((r) => r.events());
  const flagged = rows.filter((a) => a.status !== 'active').length;
  const perProcess = all.map(refreshesRotated);
  const refreshes = perProcess.reduce((x, y) => x + y, 0);
  await sc.provider.stop();
  return row(sc, {
    refreshes,
    reuse: stats.reuse_revocations,
    flagged,
    lost: lost.length,
    lateness: maxLateness(all.flat()),
    ok: stats.reuse_revocations === 0 && flagged === 0 && lost.length === 0 && perProcess.filter((p) => p > 0).length >= 2,
    notes: `3 processes, one store; rotations per process ${perProcess.join('/')}`,
    details: { provider: stats, failed, lost, per_process: perProcess },
  });
}

async function crash() {
  const n = LONG ? 200 : 40;
  const kills = LONG ? 60 : 20;
  // The provider waits up to 300 ms (long form 100 ms, for more accounts) between rotating
  // and answering: a kill then loses the rotation, the crash window refreshd must name.
  const sc = await setUp('crash', { accessTtl: LONG ? 12 : 8, refreshDelayMs: LONG ? 100 : 300, logins: logins('crash', n) });
  let inFlight = 0;
  const killLog = [];
  for (let k = 0; k < kills; k += 1) {
    await sleep(500 + Math.random() * (LONG ? 6000 : 2500));
    const { pid } = sc.main.proc;
    await sc.main.kill();
    // What the dead process held: accounts it claimed and never gave back.
    const held = sql(sc, `SELECT count(*) AS n FROM accounts WHERE lease_owner LIKE '%:${pid}:%'`)[0].n;
    inFlight += held;
    killLog.push(held);
    if (k === Math.floor(kills / 2)) {
      // The provider restarts too: its file-backed state must keep every grant, token and
      // consumed-token mark.
      await sc.provider.restart();
    }
    await sc.main.start();
  }
  // Let leases of the last kills run out and the accounts be refreshed again.
  await sleep((LONG ? 40 : 25) * 1000);
  await sc.main.stop();
  const rows = accounts(sc);
  const stats = await sc.provider.stats();
  const failed = await verifyWithProvider(sc, rows);
  const allowed = (a) => a.status === 'needs_reauth' && a.reauth_reason === 'refresh_interrupted';
  const lost = lostAccounts(rows, failed, allowed);
  const events = sc.main.events();
  const flagged = rows.filter((a) => a.status !== 'active');
  await sc.provider.stop();
  return row(sc, {
    refreshes: refreshesRotated(events),
    reuse: stats.reuse_revocations,
    flagged: flagged.length,
    lost: lost.length,
    lateness: maxLateness(events),
    ok: lost.length === 0 && flagged.length <= inFlight && flagged.every(allowed),
    notes: `${kills} SIGKILLs; in flight at the kills ${inFlight} (leases held), answers lost ${stats.lost_answers} (provider); flagged ${flagged.length} <= ${inFlight}`,
    details: {
      provider: stats, failed, lost, in_flight_at_kills: inFlight, leases_per_kill: killLog, flagged_reasons: flagged.map((a) => a.reauth_reason),
    },
  });
}

async function outage() {
  const n = LONG ? 200 : 30;
  // Steady demand is n / (accessTtl / 2) per second: keep it at about 60% of the limit, so
  // the limit only bites on the herd after the outage.
  const accessTtl = LONG ? 40 : 20;
  const down = LONG ? 90 : 30;
  const rateLimit = LONG ? 1000 : 300; // per minute
  const burst = LONG ? 20 : 5;
  const sc = await setUp('outage', {
    accessTtl,
    logins: logins('outage', n),
    refreshd: { rateLimit, burst, backoffBase: '1s', backoffMax: '10s' },
  });
  await sleep(accessTtl * 1000);
  log(`outage: provider answers 503 for ${down}s (access tokens live ${accessTtl}s)`);
  await sc.provider.outage(true);
  const downAt = Date.now();
  await sleep(down * 1000);
  const before = await sc.provider.stats();
  await sc.provider.outage(false);
  const upAt = Date.now();
  log('outage: provider recovered');
  // Every account must be refreshed (a rotation after recovery) within the bound.
  const bound = 10 + Math.ceil((n / rateLimit) * 60) + 5; // backoff_max + the rate limit's pace + slack
  let recoveredIn = null;
  for (;;) {
    const t = nowS() - 1;
    const left = sql(sc, `SELECT count(*) AS n FROM accounts WHERE last_refreshed_at IS NULL OR last_refreshed_at < ${Math.floor(upAt / 1000)}`)[0].n;
    if (left === 0) { recoveredIn = (Date.now() - upAt) / 1000; break; }
    if (Date.now() - upAt > (bound + 30) * 1000) break;
    void t;
    await sleep(250);
  }
  await sleep(5000);
  await sc.main.stop();
  const times = await sc.provider.control(`refresh-times?since=${upAt}`);
  // Token bucket: in any window of w seconds at most burst + rate * w requests.
  let worst = 0;
  let worstWindow = null;
  for (const w of [1, 5, 10, 30]) {
    const allowedN = burst + (rateLimit / 60) * w;
    let j = 0;
    for (let i = 0; i < times.length; i += 1) {
      while (times[i] - times[j] > w * 1000) j += 1;
      const ratio = (i - j + 1) / allowedN;
      if (ratio > worst) { worst = ratio; worstWindow = { window_s: w, requests: i - j + 1, allowed: allowedN }; }
    }
  }
  const rows = accounts(sc);
  const stats = await sc.provider.stats();
  const failed = await verifyWithProvider(sc, rows);
  const lost = lostAccounts(rows, failed, () => false);
  const events = sc.main.events();
  const flagged = rows.filter((a) => a.status !== 'active').length;
  await sc.provider.stop();
  const during = before.refresh_unavailable;
  return row(sc, {
    refreshes: refreshesRotated(events),
    reuse: stats.reuse_revocations,
    flagged,
    lost: lost.length,
    lateness: maxLateness(events.filter((e) => Date.parse(e.timestamp) < downAt)),
    ok: stats.reuse_revocations === 0 && flagged === 0 && lost.length === 0 && recoveredIn !== null
      && recoveredIn <= bound && worst <= 1,
    notes: `503 for ${down}s (access TTL ${accessTtl}s, ${during} requests refused); all refreshed ${recoveredIn ?? 'NOT'}s after recovery (bound ${bound}s); peak rate ${(worst * 100).toFixed(0)}% of limit ${rateLimit}/min burst ${burst}`,
    details: {
      provider: stats, failed, lost, recovered_in_s: recoveredIn, bound_s: bound, worst_window: worstWindow, downtime_s: (upAt - downAt) / 1000,
    },
  });
}

async function endOfLife() {
  const n = LONG ? 100 : 20;
  const shortTtl = LONG ? 120 : 50;
  const window = LONG ? 90 : 35;
  const half = Math.floor(n / 2);
  const sc = await setUp('end_of_life', {
    accessTtl: 10,
    refreshTtl: 3600,
    shortRefreshTtl: shortTtl,
    logins: [...logins('eol', half), ...logins('keep', n - half)],
    refreshd: { reauthWindow: `${window}s` },
  });
  await sleep((shortTtl + 8) * 1000);
  await sc.main.stop();
  const rows = accounts(sc);
  const stats = await sc.provider.stats();
  const events = sc.main.events();
  const reauth = new Map();
  for (const e of events) {
    const f = e.fields ?? e;
    if (f.event === 'reauth_required' && !reauth.has(f.account)) reauth.set(f.account, { at: Date.parse(e.timestamp), reason: f.reason });
  }
  const eol = rows.filter((a) => a.label.startsWith('eol-'));
  const keep = rows.filter((a) => !a.label.startsWith('eol-'));
  const late = eol.filter((a) => {
    const r = reauth.get(a.id);
    return !r || r.at >= a.refresh_expires_at * 1000;
  });
  const failed = await verifyWithProvider(sc, keep);
  const lost = [...lostAccounts(keep, failed, () => false), ...late];
  const flagged = rows.filter((a) => a.status !== 'active');
  await sc.provider.stop();
  return row(sc, {
    refreshes: refreshesRotated(events),
    reuse: stats.reuse_revocations,
    flagged: flagged.length,
    lost: lost.length,
    lateness: maxLateness(events),
    ok: stats.reuse_revocations === 0 && late.length === 0 && lost.length === 0
      && flagged.length === eol.length && flagged.every((a) => a.label.startsWith('eol-')),
    notes: `${eol.length} accounts with a ${shortTtl}s refresh token (window ${window}s): flagged before the end ${eol.length - late.length}/${eol.length}; reasons ${[...new Set(eol.map((a) => reauth.get(a.id)?.reason))].join(',')}`,
    details: { provider: stats, failed, lost, late: late.map((a) => a.id) },
  });
}

// The provider rotates, then the connection is cut before the answer (a proxy, a network
// failure): refreshd sees a transient failure, while the provider has retired the token it
// holds. The account is lost to the provider's reuse detection whatever the client does;
// refreshd must name it refresh_interrupted, never mistake it for a user's revocation, and
// lose nothing else.
async function cut() {
  const n = LONG ? 100 : 20;
  const seconds = LONG ? 180 : 40;
  const sc = await setUp('cut', { accessTtl: 10, cutRate: 0.02, logins: logins('cut', n) });
  await sleep(seconds * 1000);
  // No more cuts; an answer cut just before keeps its lease until the retry (backoff, up to
  // backoff_max), which flags it: wait for those retries, so that none is stopped midway.
  await sc.provider.cutRate(0);
  for (let i = 0; i < 60; i++) {
    const pending = accounts(sc).filter((a) => a.status === 'active' && a.lease_owner && a.last_error);
    if (pending.length === 0) break;
    await sleep(500);
  }
  await sc.main.stop();
  const rows = accounts(sc);
  const stats = await sc.provider.stats();
  const failed = await verifyWithProvider(sc, rows);
  const allowed = (a) => a.status === 'needs_reauth' && a.reauth_reason === 'refresh_interrupted';
  const lost = lostAccounts(rows, failed, allowed);
  const events = sc.main.events();
  const flagged = rows.filter((a) => a.status !== 'active');
  await sc.provider.stop();
  return row(sc, {
    refreshes: refreshesRotated(events),
    reuse: stats.reuse_revocations,
    flagged: flagged.length,
    lost: lost.length,
    lateness: maxLateness(events),
    ok: lost.length === 0 && flagged.length <= stats.answers_cut && flagged.every(allowed),
    notes: `${stats.answers_cut} answers cut after the rotation; flagged ${flagged.length} <= ${stats.answers_cut}, reasons ${[...new Set(flagged.map((a) => a.reauth_reason))].join(',') || '-'}`,
    details: { provider: stats, failed, lost, flagged_reasons: flagged.map((a) => a.reauth_reason) },
  });
}

// Issue 18: any standards-compliant server through the generic profile. oidc-provider takes
// client_secret_basic only (a secret holding + / = %), requires PKCE, announces no
// refresh-token end; refreshd states the lifetime in its config and adds prompt=consent for
// offline_access itself. Subjects hold `@` and `|` and must be stored exactly. (A) rotation
// with a fixed lifetime, (B) no rotation with a sliding one.
async function generic(name, { rotate, refreshTtl }) {
  const n = LONG ? 40 : 8;
  const seconds = LONG ? 120 : 20;
  // Start after the other scenarios' connect storm: on a small machine a code exchange in
  // the middle of it can outlast request_timeout (exchange_failed), which is not this test.
  if (!args.only) await sleep(15000);
  const sc = await setUp(name, {
    accessTtl: 6,
    refreshTtl,
    clientSecret: 'Gen+Sec/ret=0123%45-interop',
    basic: true,
    providerArgs: { 'auth-method': 'client_secret_basic', rotate: rotate ? 1 : 0, 'announce-refresh-expiry': 0 },
    providerFlags: ['pkce-required', ...(rotate ? [] : ['sliding'])],
    logins: logins(`auth0|${name}`, n).map((l) => `${l}@example.org`),
    refreshd: {
      providerKeys: `client_auth = "basic"
pkce = true
rotation = "${rotate ? 'always' : 'never'}"
refresh_ttl = "${rotate ? 'fixed' : 'sliding'}"
refresh_token_lifetime = "${refreshTtl}s"`,
    },
  });
  await sleep(seconds * 1000);
  await sc.main.stop();
  const rows = accounts(sc);
  const stats = await sc.provider.stats();
  // Before the verdict's refresh moves anything: the server's ends against the stored ones.
  const ends = await serverExpiries(sc, rows);
  const expiryDiffs = rows.map((a) => (ends.get(a.id) == null || a.refresh_expires_at == null
    ? Infinity : Math.abs(ends.get(a.id) - a.refresh_expires_at)));
  const maxExpiryDiff = Math.max(0, ...expiryDiffs);
  // refreshd dates a configured lifetime from the moment the answer reached it, the server
  // from the moment it issued the token: they differ by the answer's time in transit, within
  // 1 s on a quiet machine, bounded by refresh.request_timeout (5 s here) on a loaded one.
  const MAX_END_DIFF_S = 5;
  const notRefreshed = sql(sc, 'SELECT id FROM accounts WHERE last_refreshed_at IS NULL').map((r) => r.id);
  const inexact = rows.filter((a) => a.subject !== a.label).map((a) => ({ id: a.id, subject: a.subject, login: a.label }));
  const failed = await verifyWithProvider(sc, rows);
  const lost = lostAccounts(rows, failed, () => false);
  const events = sc.main.events();
  const flagged = rows.filter((a) => a.status !== 'active').length;
  const refreshes = events.filter((e) => (e.fields ?? e).event === 'refresh' && ['rotated', 'refreshed'].includes((e.fields ?? e).outcome)).length;
  await sc.provider.stop();
  return row(sc, {
    refreshes,
    reuse: stats.reuse_revocations,
    flagged,
    lost: lost.length,
    lateness: maxLateness(events),
    ok: stats.reuse_revocations === 0 && flagged === 0 && lost.length === 0 && notRefreshed.length === 0
      && inexact.length === 0 && maxExpiryDiff <= MAX_END_DIFF_S && rows.length === n,
    notes: `client_secret_basic, PKCE, ${rotate ? 'rotating, fixed' : 'not rotating, sliding'} ${refreshTtl}s refresh lifetime from the config; `
      + `not refreshed ${notRefreshed.length}, subjects altered ${inexact.length}, largest stored-vs-server refresh end difference ${maxExpiryDiff}s`,
    details: {
      provider: stats, failed, lost, not_refreshed: notRefreshed, inexact_subjects: inexact, max_expiry_diff_s: maxExpiryDiff,
    },
  });
}

const SCENARIOS = {
  steady,
  replicas,
  crash,
  outage,
  end_of_life: endOfLife,
  cut,
  generic_fixed: () => generic('generic_fixed', { rotate: true, refreshTtl: 3600 }),
  generic_sliding: () => generic('generic_sliding', { rotate: false, refreshTtl: 600 }),
};

// ----------------------------------------------------------------------------- main

const chosen = args.only ? args.only.split(',') : Object.keys(SCENARIOS);
const started = Date.now();
log(`interop harness, ${args.form} form, scenarios ${chosen.join(' ')}, work dir ${ROOT}`);
const run = async (name) => {
  try {
    return await SCENARIOS[name]();
  } catch (e) {
    log(`${name}: ${e.stack}`);
    return { scenario: name, ok: false, error: String(e) };
  }
};
const results = args.serial
  ? await chosen.reduce(async (acc, name) => [...(await acc), await run(name)], Promise.resolve([]))
  : await Promise.all(chosen.map(run));

const cols = [['scenario', 12], ['accounts', 8], ['refreshes', 9], ['reuse revocations', 17], ['flagged', 7], ['lost', 4], ['max schedule lateness', 21], ['ok', 3]];
const keys = ['scenario', 'accounts', 'refreshes', 'reuse_revocations', 'flagged', 'lost', 'max_lateness_s', 'ok'];
const line = (vals) => vals.map((v, i) => String(v).padEnd(cols[i][1])).join('  ');
console.log(`refreshd vs oidc-provider, ${args.form} form, ${((Date.now() - started) / 1000).toFixed(0)}s`);
console.log(line(cols.map((c) => c[0])));
for (const r of results) {
  console.log(line(keys.map((k) => (k === 'max_lateness_s' && r[k] !== undefined ? `${r[k]}s` : (r[k] ?? '-')))));
}
for (const r of results) console.log(`  ${r.scenario}: ${r.notes ?? r.error}`);
const outFile = args.out || path.join(ROOT, 'interop-results.json');
fs.writeFileSync(outFile, JSON.stringify({ form: args.form, seconds: (Date.now() - started) / 1000, results }, null, 2));
console.log(`results: ${outFile}`);
process.exit(results.every((r) => r.ok) ? 0 : 1);
