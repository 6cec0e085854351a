// TokenCache on a fake clock: when it fetches, what it hands out, and what it logs. The token
// source here is a scripted object (its behaviour is the point); one test at the end wires the
// real TokenSource to the real oidc-provider.
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import { Agent } from 'undici';
import type { ProfileConfig, RefreshConfig } from '../src/config.ts';
import { TokenEndpointError, TokenFetchError, TokenNetworkError } from '../src/errors.ts';
import { createLogger } from '../src/logger.ts';
import { Metrics } from '../src/metrics.ts';
import { TokenCache } from '../src/token-cache.ts';
import { TokenSource } from '../src/token-source.ts';
import type { Token } from '../src/token.ts';
import { fixed, testProfile } from './helpers/config.ts';
import { FakeClock, settle } from './helpers/fake-clock.ts';
import { startOAuthServer } from './helpers/oauth-server.ts';

const SECRET = 'cache-test-secret-Q7';
const S = 1000;

function profile(refresh: Partial<RefreshConfig> = {}, overrides: Partial<ProfileConfig> = {}): ProfileConfig {
  return testProfile({ name: 'orders', clientId: fixed('cache-test'), clientSecret: fixed(SECRET), ...overrides, refresh });
}

type Step =
  | { lifetime: number; refreshIn?: number }
  | { error: unknown; sync?: boolean }
  | { deferred: true };

interface Deferred {
  resolve(lifetime: number): void;
  reject(err: unknown): void;
}

/** A token source playing a script, one step per fetch; records when each fetch began. */
class ScriptedSource {
  readonly clock: FakeClock;
  readonly steps: Step[] = [];
  readonly calls: number[] = [];
  readonly issued: string[] = [];
  readonly pending: Deferred[] = [];

  constructor(clock: FakeClock) {
    this.clock = clock;
  }

  then(...steps: Step[]): this {
    this.steps.push(...steps);
    return this;
  }

  fetch(): Promise<Token> {
    this.calls.push(this.clock.now());
    const step = this.steps.shift();
    if (step === undefined) return Promise.reject(new TokenNetworkError('script exhausted'));
    if ('error' in step) {
      if (step.sync) throw step.error;
      return Promise.reject(step.error);
    }
    if ('deferred' in step) {
      return new Promise<Token>((resolve, reject) => {
        this.pending.push({ resolve: (lifetime) => resolve(this.token(lifetime)), reject });
      });
    }
    return Promise.resolve(this.token(step.lifetime, step.refreshIn));
  }

  token(lifetime: number, refreshIn?: number): Token {
    const accessToken = `tok-${this.issued.length + 1}-${'x'.repeat(20)}`;
    this.issued.push(accessToken);
    const now = this.clock.now();
    return { accessToken, tokenType: 'Bearer', obtainedAt: now, expiresAt: now + lifetime * S, refreshInSeconds: refreshIn };
  }
}

interface Harness {
  clock: FakeClock;
  source: ScriptedSource;
  cache: TokenCache;
  metrics: Metrics;
  /** Parsed log records, without `time`. */
  logs: Array<Record<string, unknown>>;
  /** What listeners heard: the access token (or undefined) and the time it was heard. */
  events: Array<{ at: number; token: string | undefined }>;
  /** ms since the fake clock's start. */
  at(ms: number): number;
}

function setup(t: TestContext, options: { profile?: ProfileConfig; random?: () => number; source?: { fetch(): Promise<Token> } } = {}): Harness {
  const clock = new FakeClock();
  const t0 = clock.now();
  const source = new ScriptedSource(clock);
  const logs: Array<Record<string, unknown>> = [];
  const raw: string[] = [];
  const logger = createLogger('debug', {
    write(line: string) {
      raw.push(line);
      const { time: _time, ...record } = JSON.parse(line) as Record<string, unknown>;
      logs.push(record);
    },
  });
  const metrics = new Metrics({ defaultMetrics: false });
  const cache = new TokenCache({ profile: options.profile ?? profile(), source: options.source ?? source, logger, metrics, clock, random: options.random ?? (() => 0.5) });
  const events: Harness['events'] = [];
  cache.onChange((token) => events.push({ at: clock.now() - t0, token: token?.accessToken }));
  t.after(() => {
    cache.stop();
    // Nothing secret in any log line of any test: not the client secret, not a token.
    for (const line of raw) {
      assert.ok(!line.includes(SECRET), `secret in a log line: ${line}`);
      for (const token of source.issued) assert.ok(!line.includes(token), `token in a log line: ${line}`);
    }
  });
  return { clock, source, cache, metrics, logs, events, at: (ms) => t0 + ms };
}

async function fetches(metrics: Metrics): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const v of (await metrics.tokenFetches.get()).values) if (v.value > 0) out[`${v.labels.result}/${v.labels.code}`] = v.value;
  return out;
}

async function observed(metrics: Metrics): Promise<number> {
  const count = (await metrics.tokenFetchSeconds.get()).values.find((v) => v.metricName === 'oauth2_extproc_token_fetch_duration_seconds_count');
  return count?.value ?? 0;
}

function successLog(fields: { expiresInSeconds: number; expiresAt: string; refreshInSeconds: number; durationMs?: number }): Record<string, unknown> {
  return { level: 'info', service: 'oauth2-extproc', profile: 'orders', outcome: 'success', durationMs: 0, ...fields, msg: 'token fetched' };
}

test('start() fetches at once, serves the token and tells the listeners', async (t) => {
  const h = setup(t);
  h.source.then({ lifetime: 3600 });
  h.cache.start();
  h.cache.start();
  assert.deepEqual(h.source.calls, [h.at(0)]);
  assert.equal(h.cache.current(), undefined, 'nothing before the answer');

  await settle();
  assert.equal(h.cache.current()?.accessToken, h.source.issued[0]);
  assert.equal(h.cache.lastError, undefined);
  assert.deepEqual(h.events, [{ at: 0, token: h.source.issued[0] }]);
  assert.deepEqual(h.logs, [successLog({ expiresInSeconds: 3600, expiresAt: '2030-01-01T13:00:00.000Z', refreshInSeconds: 1800 })]);
  assert.deepEqual(await fetches(h.metrics), { 'success/': 1 });
  assert.equal(await observed(h.metrics), 1);
  assert.ok(h.clock.pending().length > 0 && h.clock.pending().every((timer) => !timer.refed), 'timers are unref\'d');
});

for (const [random, expected] of [[0, 400], [1, 600]] as const) {
  test(`the refresh comes at share × lifetime ± jitter (random ${random} → ${expected} s)`, async (t) => {
    const h = setup(t, { profile: profile({ share: 0.5, jitter: 0.1 }), random: () => random });
    h.source.then({ lifetime: 1000 }, { lifetime: 1000 });
    h.cache.start();
    await h.clock.advanceTo(h.at(expected * S - 1));
    assert.equal(h.source.calls.length, 1);
    await h.clock.advanceTo(h.at(expected * S));
    assert.deepEqual(h.source.calls, [h.at(0), h.at(expected * S)]);
    assert.equal(h.cache.current()?.accessToken, h.source.issued[1]);
    assert.equal(h.logs[0]?.refreshInSeconds, expected);
  });
}

test('the IdP\'s refresh_in decides the refresh moment', async (t) => {
  const h = setup(t, { profile: profile({ share: 0.5, jitter: 0.25 }), random: () => 0 });
  h.source.then({ lifetime: 3600, refreshIn: 600 }, { lifetime: 3600 });
  h.cache.start();
  await h.clock.advanceTo(h.at(600 * S - 1));
  assert.equal(h.source.calls.length, 1);
  await h.clock.advanceTo(h.at(600 * S));
  assert.deepEqual(h.source.calls, [h.at(0), h.at(600 * S)]);
  assert.equal(h.logs[0]?.refreshInSeconds, 600);
});

test('a refresh is never planned later than one fetch timeout before the usable end', async (t) => {
  // share + jitter = 1.2 × lifetime: pulled in to (1000 s − 30 s margin) − 20 s timeout.
  const h = setup(t, { profile: profile({ share: 0.95, jitter: 0.25, marginSeconds: 30 }, { timeoutMs: 20_000 }), random: () => 1 });
  h.source.then({ lifetime: 1000 }, { lifetime: 1000 });
  h.cache.start();
  await h.clock.advanceTo(h.at(950 * S - 1));
  assert.equal(h.source.calls.length, 1);
  await h.clock.advanceTo(h.at(950 * S));
  assert.equal(h.source.calls.length, 2);
});

test('a token living shorter than twice the margin is used for half its life', async (t) => {
  // 40 s lifetime, 30 s margin: usable until 20 s (not 10 s, and not never); refreshed at 10 s.
  const h = setup(t, { profile: profile({ marginSeconds: 30, minBackoffSeconds: 60, maxBackoffSeconds: 60 }) });
  h.source.then({ lifetime: 40 }, { error: new TokenNetworkError('down') });
  h.cache.start();
  await h.clock.advanceTo(h.at(20 * S - 1));
  assert.deepEqual(h.source.calls, [h.at(0), h.at(10 * S)]);
  assert.equal(h.cache.current()?.accessToken, h.source.issued[0]);
  await h.clock.advanceTo(h.at(20 * S));
  assert.equal(h.cache.current(), undefined);
  assert.deepEqual(h.events, [{ at: 0, token: h.source.issued[0] }, { at: 20 * S, token: undefined }]);
});

test('a token that lives for months is refreshed on time despite setTimeout\'s 24.8-day limit', async (t) => {
  const h = setup(t);
  const days60 = 60 * 24 * 3600;
  h.source.then({ lifetime: days60 }, { lifetime: days60 });
  h.cache.start();
  await h.clock.advanceTo(h.at((days60 / 2) * S - 1));
  assert.equal(h.source.calls.length, 1);
  await h.clock.advanceTo(h.at((days60 / 2) * S));
  assert.equal(h.source.calls.length, 2);
});

test('single flight: concurrent refresh() calls and a due timer share one fetch', async (t) => {
  const h = setup(t);
  h.source.then({ deferred: true }, { lifetime: 100 }, { deferred: true });
  h.cache.start();
  const joined = Array.from({ length: 100 }, () => h.cache.refresh());
  assert.equal(h.source.calls.length, 1);
  h.source.pending[0]!.resolve(100);
  const tokens = await Promise.all(joined);
  assert.ok(tokens.every((token) => token !== undefined && token.accessToken === h.source.issued[0]));
  assert.equal(h.source.calls.length, 1);

  // Once answered, refresh() fetches anew.
  assert.equal((await h.cache.refresh())?.accessToken, h.source.issued[1]);
  assert.equal(h.source.calls.length, 2);

  // A fetch still in flight when the refresh moment comes is not doubled by the timer.
  const slow = h.cache.refresh();
  await h.clock.advance(200 * S);
  assert.equal(h.source.calls.length, 3);
  h.source.pending[1]!.resolve(100);
  assert.equal((await slow)?.accessToken, h.source.issued[2]);
  assert.equal(h.source.calls.length, 3);
});

for (const [random, gaps] of [[1, [1, 2, 4, 8, 8, 8, 8]], [0, [1, 1, 2, 4, 4, 4, 4]]] as const) {
  test(`backoff doubles up to its cap (random ${random}: ${gaps.join(', ')} s)`, async (t) => {
    const h = setup(t, { profile: profile({ minBackoffSeconds: 1, maxBackoffSeconds: 8 }), random: () => random });
    const down = new TokenNetworkError('cannot reach the token endpoint http://127.0.0.1:9 (ECONNREFUSED)');
    h.source.then(...Array.from({ length: 7 }, () => ({ error: down })), { lifetime: 1000 }, { error: down }, { error: down });
    h.cache.start();
    await h.clock.advanceTo(h.at(100 * S));
    const times = h.source.calls.map((c) => (c - h.at(0)) / S);
    assert.equal(times.length, 8);
    assert.deepEqual(times.slice(1).map((c, i) => c - times[i]!), gaps);
    assert.equal(h.cache.lastError, undefined, 'the success cleared it');

    // After a success the backoff starts again from the bottom.
    await h.cache.refresh();
    await h.clock.advance(1 * S);
    assert.deepEqual(h.source.calls.slice(8), [h.at(100 * S), h.at(101 * S)]);
    assert.deepEqual(h.logs[0], {
      level: 'warn',
      service: 'oauth2-extproc',
      profile: 'orders',
      outcome: 'error',
      code: 'OAUTH2_ERR_TOKEN_NETWORK',
      reason: 'cannot reach the token endpoint http://127.0.0.1:9 (ECONNREFUSED)',
      durationMs: 0,
      retryInSeconds: 1,
      msg: 'token fetch failed',
    });
    assert.deepEqual(await fetches(h.metrics), { 'error/OAUTH2_ERR_TOKEN_NETWORK': 9, 'success/': 1 });
  });
}

test('Retry-After is honoured (capped at an hour), and refresh() does not jump it', async (t) => {
  const h = setup(t, { profile: profile({ minBackoffSeconds: 1, maxBackoffSeconds: 60 }) });
  const throttled = new TokenEndpointError(429, { error: 'temporarily_unavailable', errorDescription: 'slow down', retryAfterSeconds: 120 });
  const forever = new TokenEndpointError(503, { retryAfterSeconds: 86_400 });
  h.source.then({ error: throttled }, { error: forever }, { lifetime: 3600 });
  h.cache.start();
  await settle();
  assert.equal(h.cache.lastError, throttled);

  assert.equal(await h.cache.refresh(), undefined);
  await h.clock.advanceTo(h.at(120 * S - 1));
  assert.equal(await h.cache.refresh(), undefined);
  assert.deepEqual(h.source.calls, [h.at(0)], 'nothing before Retry-After');

  await h.clock.advanceTo(h.at(120 * S));
  assert.deepEqual(h.source.calls, [h.at(0), h.at(120 * S)]);
  await h.clock.advanceTo(h.at((120 + 3600) * S));
  assert.deepEqual(h.source.calls, [h.at(0), h.at(120 * S), h.at(3720 * S)]);
  assert.equal(h.cache.current()?.accessToken, h.source.issued[0]);

  assert.deepEqual(h.logs.slice(0, 2), [
    {
      level: 'warn', service: 'oauth2-extproc', profile: 'orders', outcome: 'error', code: 'OAUTH2_ERR_TOKEN_STATUS',
      status: 429, oauthError: 'temporarily_unavailable', oauthErrorDescription: 'slow down',
      reason: 'token endpoint answered HTTP 429 (error=temporarily_unavailable: slow down)',
      durationMs: 0, retryInSeconds: 120, msg: 'token fetch failed',
    },
    {
      level: 'warn', service: 'oauth2-extproc', profile: 'orders', outcome: 'error', code: 'OAUTH2_ERR_TOKEN_STATUS',
      status: 503, reason: 'token endpoint answered HTTP 503 (no OAuth2 error body)',
      durationMs: 0, retryInSeconds: 3600, msg: 'token fetch failed',
    },
  ]);
});

test('after a failed refresh the old token is served until expiry minus margin, never after', async (t) => {
  // 100 s token, 10 s margin: usable until 90 s; refresh at 50 s; retries every 15 s.
  const h = setup(t, { profile: profile({ marginSeconds: 10, minBackoffSeconds: 15, maxBackoffSeconds: 15 }) });
  const down = new TokenNetworkError('down');
  h.source.then({ lifetime: 100 }, { error: down }, { error: down }, { error: down }, { error: down }, { lifetime: 100 });
  h.cache.start();

  await h.clock.advanceTo(h.at(90 * S - 1));
  assert.deepEqual(h.source.calls, [0, 50, 65, 80].map((s) => h.at(s * S)));
  assert.equal(h.cache.current()?.accessToken, h.source.issued[0]);
  assert.equal(h.cache.lastError, down);
  assert.deepEqual(h.events, [{ at: 0, token: h.source.issued[0] }]);

  await h.clock.advanceTo(h.at(90 * S));
  assert.equal(h.cache.current(), undefined);
  assert.deepEqual(h.events, [{ at: 0, token: h.source.issued[0] }, { at: 90 * S, token: undefined }]);

  await h.clock.advanceTo(h.at(110 * S));
  assert.deepEqual(h.source.calls, [0, 50, 65, 80, 95, 110].map((s) => h.at(s * S)));
  assert.equal(h.cache.current()?.accessToken, h.source.issued[1]);
  assert.deepEqual(h.events.at(-1), { at: 110 * S, token: h.source.issued[1] });

  const failure = (retry: number, validFor?: number) => ({
    level: 'warn', service: 'oauth2-extproc', profile: 'orders', outcome: 'error', code: 'OAUTH2_ERR_TOKEN_NETWORK',
    reason: 'down', durationMs: 0, retryInSeconds: retry, ...(validFor === undefined ? {} : { tokenValidForSeconds: validFor }), msg: 'token fetch failed',
  });
  assert.deepEqual(h.logs, [
    successLog({ expiresInSeconds: 100, expiresAt: '2030-01-01T12:01:40.000Z', refreshInSeconds: 50 }),
    failure(15, 40),
    failure(15, 25),
    failure(15, 10),
    { level: 'warn', service: 'oauth2-extproc', profile: 'orders', code: 'OAUTH2_ERR_TOKEN_NETWORK', msg: 'no usable token: the last one reached its expiry margin' },
    failure(15),
    successLog({ expiresInSeconds: 100, expiresAt: '2030-01-01T12:03:30.000Z', refreshInSeconds: 50 }),
  ]);
});

test('Retry-After is honoured even past the held token\'s usable end', async (t) => {
  const h = setup(t, { profile: profile({ marginSeconds: 10 }) });
  h.source.then({ lifetime: 100 }, { error: new TokenEndpointError(503, { retryAfterSeconds: 300 }) }, { lifetime: 100 });
  h.cache.start();
  await h.clock.advanceTo(h.at(349 * S));
  assert.deepEqual(h.source.calls, [h.at(0), h.at(50 * S)]);
  assert.deepEqual(h.events, [{ at: 0, token: h.source.issued[0] }, { at: 90 * S, token: undefined }]);
  await h.clock.advanceTo(h.at(350 * S));
  assert.equal(h.source.calls.length, 3);
  assert.equal(h.cache.current()?.accessToken, h.source.issued[1]);
});

test('stop() cancels every timer; current() still answers for the streams draining', async (t) => {
  const h = setup(t, { profile: profile({ marginSeconds: 30 }) });
  h.source.then({ lifetime: 3600 });
  h.cache.start();
  await settle();
  assert.equal(h.clock.pending().length, 2, 'the refresh and the expiry');
  h.cache.stop();
  assert.equal(h.clock.pending().length, 0);
  assert.equal(h.cache.current()?.accessToken, h.source.issued[0]);
  h.cache.start();
  assert.equal(await h.cache.refresh(), h.cache.current());
  await h.clock.advance(3570 * S);
  assert.equal(h.cache.current(), undefined);
  assert.deepEqual(h.source.calls, [h.at(0)]);
  assert.deepEqual(h.events, [{ at: 0, token: h.source.issued[0] }], 'no listener call after stop()');
});

test('stop() makes a late answer, good or bad, be ignored', async (t) => {
  const h = setup(t);
  h.source.then({ deferred: true });
  h.cache.start();
  h.cache.stop();
  h.source.pending[0]!.resolve(3600);
  await settle();
  assert.equal(h.cache.current(), undefined);

  const h2 = setup(t);
  h2.source.then({ deferred: true });
  h2.cache.start();
  const joined = h2.cache.refresh();
  h2.cache.stop();
  h2.source.pending[0]!.reject(new TokenNetworkError('late'));
  assert.equal(await joined, undefined);
  assert.equal(h2.cache.lastError, undefined);

  for (const { clock, logs, events, metrics } of [h, h2]) {
    assert.deepEqual(clock.pending(), []);
    assert.deepEqual(logs, []);
    assert.deepEqual(events, []);
    assert.deepEqual(await fetches(metrics), {});
  }
});

test('a source throwing something other than a TokenFetchError is logged and retried, never a crash', async (t) => {
  const unhandled: unknown[] = [];
  const onUnhandled = (reason: unknown) => unhandled.push(reason);
  process.on('unhandledRejection', onUnhandled);
  t.after(() => process.off('unhandledRejection', onUnhandled));

  const h = setup(t, { random: () => 1 });
  h.source.then(
    { error: new TypeError(`boom ${SECRET}`), sync: true },
    { error: `a string with ${SECRET}` },
    { lifetime: 3600 },
  );
  h.cache.start();
  await settle();
  assert.ok(h.cache.lastError instanceof TokenFetchError);
  assert.equal(h.cache.lastError.code, 'OAUTH2_ERR_UNEXPECTED');
  assert.equal(h.cache.lastError.message, 'the token source failed unexpectedly (TypeError)');

  await h.clock.advance(1 * S);
  assert.equal(h.cache.lastError?.message, 'the token source failed unexpectedly (string)');
  await h.clock.advance(2 * S);
  assert.equal(h.cache.current()?.accessToken, h.source.issued[0]);
  assert.deepEqual(h.logs.map((r) => [r.code, r.reason, r.retryInSeconds]), [
    ['OAUTH2_ERR_UNEXPECTED', 'the token source failed unexpectedly (TypeError)', 1],
    ['OAUTH2_ERR_UNEXPECTED', 'the token source failed unexpectedly (string)', 2],
    [undefined, undefined, undefined],
  ]);
  assert.deepEqual(await fetches(h.metrics), { 'error/OAUTH2_ERR_UNEXPECTED': 2, 'success/': 1 });
  await settle();
  assert.deepEqual(unhandled, []);
});

test('a token already past its usable end on arrival is a failure, not a token', async (t) => {
  const stale: Token = { accessToken: 'stale-token', tokenType: 'Bearer', obtainedAt: 0, expiresAt: 1000, refreshInSeconds: undefined };
  const source = { fetch: async () => stale };
  const h = setup(t, { source });
  h.cache.start();
  await settle();
  assert.equal(h.cache.current(), undefined);
  assert.deepEqual(h.events, []);
  assert.equal(h.cache.lastError?.code, 'OAUTH2_ERR_TOKEN_RESPONSE');
  assert.equal(h.cache.lastError?.message, 'the token was past its usable end on arrival (lifetime 1 s)');
  assert.equal(h.logs[0]?.retryInSeconds, 1);
});

test('a listener that throws does not stop the others, and can unsubscribe', async (t) => {
  const h = setup(t);
  h.source.then({ lifetime: 3600 }, { lifetime: 3600 });
  h.cache.onChange(() => {
    throw new Error('listener bug');
  });
  const seen: Array<string | undefined> = [];
  const off = h.cache.onChange((token) => seen.push(token?.accessToken));
  h.cache.start();
  await settle();
  off();
  await h.cache.refresh();
  assert.deepEqual(seen, [h.source.issued[0]]);
  assert.equal(h.events.length, 2, 'the harness listener, registered first, heard both');
  assert.deepEqual(h.logs.filter((r) => r.level === 'error'), [
    { level: 'error', service: 'oauth2-extproc', profile: 'orders', error: { code: 'OAUTH2_ERR_UNEXPECTED', message: 'listener bug' }, msg: 'token listener failed' },
    { level: 'error', service: 'oauth2-extproc', profile: 'orders', error: { code: 'OAUTH2_ERR_UNEXPECTED', message: 'listener bug' }, msg: 'token listener failed' },
  ]);
});

test('wired to the real TokenSource and oidc-provider', async (t) => {
  const server = await startOAuthServer({ ttlSeconds: 300 });
  const dispatcher = new Agent();
  t.after(async () => {
    await dispatcher.close();
    await server.close();
  });
  const client = server.clients.basic;
  const p = profile({ share: 0.5, jitter: 0.1, minBackoffSeconds: 5 }, {
    tokenUrl: server.tokenUrl,
    clientAuth: 'client_secret_basic',
    clientId: { read: () => client.clientId },
    clientSecret: { read: () => client.clientSecret },
  });
  // The fake clock starts at real time: the server's tokens are stamped with it.
  const clock = new FakeClock(Math.floor(Date.now() / 1000) * 1000);
  const logs: string[] = [];
  const logger = createLogger('debug', { write: (line: string) => void logs.push(line) });
  const cache = new TokenCache({ profile: p, source: new TokenSource(p, { dispatcher, clock }), logger, metrics: new Metrics({ defaultMetrics: false }), clock, random: () => 0.5 });
  t.after(() => cache.stop());
  const next = () => new Promise<Token | undefined>((resolve) => {
    const off = cache.onChange((token) => {
      off();
      resolve(token);
    });
  });

  let changed = next();
  cache.start();
  const first = await changed;
  assert.ok(first !== undefined);
  assert.equal(cache.current(), first);
  assert.equal((await server.verify(first.accessToken)).client_id, client.clientId);

  // The background refresh at half of the 300 s lifetime, then a refused one that keeps the old token.
  changed = next();
  await clock.advance(150 * S);
  const second = await changed;
  assert.ok(second !== undefined && second.accessToken !== first.accessToken);
  server.override({ status: 400, headers: { 'content-type': 'application/json' }, body: '{"error":"invalid_client","error_description":"client authentication failed"}' });
  const held = await cache.refresh();
  assert.equal(held, second);
  assert.equal(cache.lastError?.code, 'OAUTH2_ERR_TOKEN_STATUS');
  assert.equal(server.tokenRequests.length, 3);

  const records = logs.map((line) => {
    const { time: _time, durationMs: _duration, ...rest } = JSON.parse(line) as Record<string, unknown>;
    return rest;
  });
  const success = { level: 'info', service: 'oauth2-extproc', profile: 'orders', outcome: 'success', expiresInSeconds: 300, refreshInSeconds: 150, msg: 'token fetched' };
  assert.deepEqual(records, [
    { ...success, expiresAt: new Date(first.expiresAt).toISOString() },
    { ...success, expiresAt: new Date(second.expiresAt).toISOString() },
    {
      level: 'warn', service: 'oauth2-extproc', profile: 'orders', outcome: 'error', code: 'OAUTH2_ERR_TOKEN_STATUS', status: 400,
      oauthError: 'invalid_client', oauthErrorDescription: 'client authentication failed',
      reason: 'token endpoint answered HTTP 400 (error=invalid_client: client authentication failed)',
      retryInSeconds: 5, tokenValidForSeconds: 270, msg: 'token fetch failed',
    },
  ]);
  for (const line of logs) {
    assert.ok(!line.includes(client.clientSecret) && !line.includes(first.accessToken) && !line.includes(second.accessToken));
  }
});

test('an absurd lifetime from any source is read as a year: no date arithmetic throws, every listener hears of it', async (t) => {
  const h = setup(t);
  // 1e13 s: expiresAt would be past Date's range, where toISOString throws a RangeError.
  h.source.then({ lifetime: 1e13, refreshIn: 1e300 });
  h.cache.start();
  await settle();
  assert.equal(h.cache.current()?.accessToken, h.source.issued[0]);
  assert.deepEqual(h.events, [{ at: 0, token: h.source.issued[0] }]);
  const year = 365 * 24 * 3600;
  assert.deepEqual(h.logs, [successLog({ expiresInSeconds: year, expiresAt: '2031-01-01T12:00:00.000Z', refreshInSeconds: year / 2 })]);
  assert.equal(h.cache.usableUntil, h.at((year - 30) * S));
});

test('a token with no finite lifetime, or one too large for a header, is a coded failure and the held token stays', async (t) => {
  const clock = new FakeClock();
  const tokens: Token[] = [
    { accessToken: 'good-token', tokenType: 'Bearer', obtainedAt: clock.now(), expiresAt: clock.now() + 3600 * S, refreshInSeconds: undefined },
    { accessToken: 'nan-token', tokenType: 'Bearer', obtainedAt: clock.now(), expiresAt: Number.NaN, refreshInSeconds: undefined },
    { accessToken: 'x'.repeat(16_384 - 'Bearer '.length), tokenType: 'Bearer', obtainedAt: clock.now(), expiresAt: clock.now() + 3600 * S, refreshInSeconds: undefined },
    { accessToken: 'x'.repeat(16_384 - 'Bearer '.length + 1), tokenType: 'Bearer', obtainedAt: clock.now(), expiresAt: clock.now() + 3600 * S, refreshInSeconds: undefined },
  ];
  const source = { fetch: async () => tokens.shift()! };
  const h = setup(t, { source });
  assert.equal(h.cache.tried, false);
  h.cache.start();
  await settle();
  assert.equal(h.cache.tried, true);
  assert.equal(h.cache.current()?.accessToken, 'good-token');

  await h.cache.refresh();
  assert.equal(h.cache.lastError?.code, 'OAUTH2_ERR_TOKEN_RESPONSE');
  assert.equal(h.cache.lastError?.message, 'the token has no valid lifetime');
  assert.equal(h.cache.current()?.accessToken, 'good-token');

  await h.clock.advance(2 * S); // the retry after the backoff
  assert.equal(h.cache.current()?.accessToken.length, 16_377, 'exactly maxTokenBytes is accepted');
  const held = await h.cache.refresh();
  assert.equal(held?.accessToken.length, 16_377);
  assert.equal(h.cache.lastError?.message, 'the token is 16385 bytes as a header value, more than maxTokenBytes (16384): Envoy would refuse requests carrying it');
  assert.deepEqual(await fetches(h.metrics), { 'success/': 2, 'error/OAUTH2_ERR_TOKEN_RESPONSE': 2 });
});
