// refresh.onBackendStatus: a backend that refuses the token a request carried gets a new one
// fetched at once, at most once per minBackoffSeconds. The real stream handler on a grpc-js
// server, spoken to by the upstream-proto client; the real token cache and source against the
// real oidc-provider. Only time is fake (the rate limit), so no test waits for a real second.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { parseConfig, type ProfileConfig } from '../src/config.ts';
import { createLogger } from '../src/logger.ts';
import { Metrics } from '../src/metrics.ts';
import { TokenCache } from '../src/token-cache.ts';
import { TokenSource } from '../src/token-source.ts';
import { ExtProcClient, requestHeaders, setHeaders, TYPICAL_HEADERS } from './helpers/extproc-client.ts';
import { serveExtProc, type ExtProcServer } from './helpers/ext-proc-server.ts';
import { FakeClock } from './helpers/fake-clock.ts';
import { startOAuthServer, type OAuthServer } from './helpers/oauth-server.ts';

let idp: OAuthServer;
let server: ExtProcServer | undefined;
let client: ExtProcClient;
const clock = new FakeClock(Date.now());
const caches = new Map<string, TokenCache>();
const logLines: Array<Record<string, any>> = [];

before(async () => {
  idp = await startOAuthServer();
  const { clientId, clientSecret } = idp.clients.post;
  const config = parseConfig(`
profiles:
  default:
    tokenUrl: ${idp.tokenUrl}
    clientId: ${clientId}
    clientSecret: '${clientSecret}'
    refresh: { onBackendStatus: [401, 403], minBackoffSeconds: 5 }
  plain:
    tokenUrl: ${idp.tokenUrl}
    clientId: ${clientId}
    clientSecret: '${clientSecret}'
`, { env: {} });
  const logger = createLogger('info', { write: (line: string) => void logLines.push(JSON.parse(line)) });
  const metrics = new Metrics({ defaultMetrics: false });
  const profiles = Object.values(config.profiles) as ProfileConfig[];
  for (const profile of profiles) {
    const cache = new TokenCache({ profile, source: new TokenSource(profile, { clock }), logger, metrics, clock });
    caches.set(profile.name, cache);
    cache.start();
    await cache.refresh();
  }
  server = await serveExtProc({ profiles: profiles.map((p) => ({ config: p, tokens: caches.get(p.name)! })), logger, metrics });
  client = new ExtProcClient(server.address);
});

after(async () => {
  client?.close();
  server?.close();
  for (const cache of caches.values()) cache.stop();
  await idp?.close();
});

/**
 * One HTTP request as Envoy runs it on a route that sends response headers: request_headers,
 * then response_headers with the backend's status, each answered. Returns the token injected.
 */
function request(status: number, profile?: string): Promise<{ authorization: string; responseReply: Record<string, any> }> {
  const call = client.open(profile);
  const replies: Array<Record<string, any>> = [];
  return new Promise((resolve, reject) => {
    call.on('error', reject);
    call.on('data', (reply: Record<string, any>) => {
      replies.push(reply);
      if (replies.length === 1) {
        call.write({ response_headers: { headers: { headers: [{ key: ':status', raw_value: Buffer.from(String(status)) }] } } });
      } else {
        call.end();
      }
    });
    call.on('status', () => resolve({ authorization: setHeaders(replies[0]!).authorization!, responseReply: replies[1]! }));
    call.write(requestHeaders(TYPICAL_HEADERS, false));
  });
}

const refusalsLogged = (): number => logLines.filter((l) => l.msg === 'the backend refused the token: fetching a new one').length;

/** Resolves with the next token the profile's cache hands out (the fetch a refusal started). */
function nextToken(profile = 'default'): Promise<unknown> {
  return new Promise((resolve) => {
    const off = caches.get(profile)!.onChange((token) => {
      off();
      resolve(token);
    });
  });
}

test('a refused token is replaced at once, and only once per minBackoffSeconds', async () => {
  const fetchesAtStart = idp.tokenRequests.length;
  const first = (await request(200)).authorization;
  assert.equal(refusalsLogged(), 0, 'a 200 changes nothing');

  const arrived = nextToken();
  const refused = await request(401);
  assert.equal(refused.authorization, first);
  assert.deepEqual(refused.responseReply, { response: 'response_headers', response_headers: {} }, 'response headers get an empty reply of their kind');
  await arrived;
  assert.equal(idp.tokenRequests.length, fetchesAtStart + 1, 'the 401 fetched one new token');
  const second = (await request(200)).authorization;
  assert.notEqual(second, first, 'the next request carries the new token');
  assert.equal(logLines.filter((l) => l.msg === 'the backend refused the token: fetching a new one').at(-1)?.status, 401);

  // A backend that refuses every token: within minBackoffSeconds nothing more is fetched (the
  // decision is taken before the response_headers reply is written, so it is visible here).
  for (let i = 0; i < 5; i++) await request(403);
  assert.equal(refusalsLogged(), 1, 'no second fetch within the backoff period');
  assert.equal((await request(200)).authorization, second);

  await clock.advance(5_000);
  const third = nextToken();
  await request(401);
  await third;
  assert.equal(refusalsLogged(), 2);
  assert.equal(idp.tokenRequests.length, fetchesAtStart + 2, 'one more fetch once the period is over');
  assert.notEqual((await request(200)).authorization, second);
});

test('a refusal of a token that was already replaced, or a status not listed, fetches nothing', async () => {
  await clock.advance(5_000);
  const refusals = refusalsLogged();
  await request(500);
  await request(404);
  assert.equal(refusalsLogged(), refusals);

  const cache = caches.get('default')!;
  const old = cache.current()!;
  const arrived = nextToken();
  await request(401); // replaces `old`
  await arrived;
  await clock.advance(5_000);
  assert.equal(cache.rejected(old, 401), false, 'the refused token is no longer the one held');
  assert.equal(refusalsLogged(), refusals + 1);
});

test('a profile without refresh.onBackendStatus ignores the backend\'s status', async () => {
  await clock.advance(5_000);
  const refusals = refusalsLogged();
  const { responseReply } = await request(401, 'plain');
  assert.deepEqual(responseReply, { response: 'response_headers', response_headers: {} });
  assert.equal(refusalsLogged(), refusals);
});

test('refresh.onBackendStatus is a list of 4xx/5xx statuses', () => {
  const base = 'profiles:\n  default: { tokenUrl: "https://idp.test/token", clientId: a, clientSecret: b, refresh: { onBackendStatus: %s } }\n';
  assert.deepEqual(parseConfig(base.replace('%s', '[401, 401, 403]'), { env: {} }).profiles.default!.refresh.onBackendStatus, [401, 403]);
  assert.deepEqual(parseConfig(base.replace('%s', '[]'), { env: {} }).profiles.default!.refresh.onBackendStatus, []);
  assert.throws(() => parseConfig(base.replace('%s', '401'), { env: {} }), /profiles\.default\.refresh\.onBackendStatus: must be a list of HTTP statuses/);
  assert.throws(() => parseConfig(base.replace('%s', '[200]'), { env: {} }), /profiles\.default\.refresh\.onBackendStatus\[0\]: must be at least 400/);
});
