// refresh.onBackendStatus through the real Envoy running the shipped envoy/envoy.yaml: its
// /reports/ route sends response headers to the sidecar, so a backend that refuses a token
// (401) gets a new one on the next request; one that refuses every token gets at most one new
// token per refresh.minBackoffSeconds, also when a worker process serves the stream. The
// backend is a node:http server that answers 401 as told; the token endpoint is oidc-provider.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { profileFor, startSidecar } from '../helpers/sidecar.ts';
import { ENVOY_MISSING, eventually, findEnvoy, send } from '../helpers/envoy.ts';
import { startHttpBackend, useStack } from '../helpers/e2e-stack.ts';

const skip = findEnvoy() === undefined && !process.env.CI ? ENVOY_MISSING : false;
const MIN_BACKOFF_SECONDS = 1;

/** 'once': refuse the first request carrying each token; 'always': refuse every one; 'never'. */
let refuse: 'once' | 'always' | 'never' = 'never';
const refusedTokens = new Set<string>();
const seen: Array<{ path: string; authorization: string; status: number }> = [];

const stack = useStack({
  skip,
  backend: () => startHttpBackend((req, res) => {
    const authorization = req.headers.authorization ?? '';
    let status = 200;
    if (refuse === 'always' || (refuse === 'once' && !refusedTokens.has(authorization))) {
      refusedTokens.add(authorization);
      status = 401;
    }
    seen.push({ path: req.url ?? '', authorization, status });
    req.resume();
    res.writeHead(status, { 'content-type': 'text/plain', 'www-authenticate': status === 401 ? 'Bearer error="invalid_token"' : 'none' }).end(String(status));
  }),
  sidecar: ({ idp }) => {
    const refresh = { onBackendStatus: [401], minBackoffSeconds: MIN_BACKOFF_SECONDS };
    return startSidecar({
      config: {
        // Two workers: the refusal is seen in a worker, the token is fetched by the primary (the
        // single-process path is covered by test/backend-status.test.ts).
        server: { workers: 2 },
        profiles: {
          // The default route sends no response headers: its profile never hears of a 401.
          default: profileFor(idp, { refresh }),
          reports: profileFor(idp, {
            clientId: idp.clients.basic.clientId,
            clientSecret: idp.clients.basic.clientSecret,
            clientAuth: 'client_secret_basic',
            refresh,
          }),
        },
      },
    });
  },
  envoy: { config: 'envoy.yaml' },
});

const reportsFetches = (): number => stack.idp.tokenRequests.filter((r) => r.authorization?.startsWith('Basic ')).length;
const refusals = (): number => stack.sidecar.logs().filter((l) => l.msg === 'the backend refused the token: fetching a new one').length;

test('the backend refuses a token once: the next request carries a new one', { skip }, async () => {
  refuse = 'once';
  const fetchesBefore = reportsFetches();
  const first = await send(`${stack.envoy.url}/reports/2026`);
  assert.equal(first.status, 401, 'the refusal reaches the caller (ext_proc cannot replay a request)');
  const refusedToken = seen.at(-1)!.authorization;
  assert.match(refusedToken, /^Bearer ey/);

  await eventually('a new token for the reports profile', () => (reportsFetches() > fetchesBefore ? true : undefined));
  const next = await eventually('a request that carries the new token', async () => {
    const reply = await send(`${stack.envoy.url}/reports/2026`);
    const carried = seen.at(-1)!.authorization;
    return carried !== refusedToken ? { reply, carried } : undefined;
  });
  // 'once' refuses the first request carrying the new token too; the one after it passes.
  const settled = await send(`${stack.envoy.url}/reports/2026`);
  assert.equal(settled.status, 200);
  assert.equal(seen.at(-1)!.authorization, next.carried);
  assert.equal((await stack.idp.verify(next.carried.slice('Bearer '.length))).client_id, stack.idp.clients.basic.clientId);
});

test('a backend that refuses every token: at most one token request per backoff period', { skip }, async () => {
  // Past the previous test's backoff, so its refusal does not count here.
  await new Promise((resolve) => setTimeout(resolve, MIN_BACKOFF_SECONDS * 1000));
  refuse = 'always';
  const fetchesBefore = reportsFetches();
  const started = Date.now();
  for (let i = 0; i < 40; i++) {
    const reply = await send(`${stack.envoy.url}/reports/${i}`);
    assert.equal(reply.status, 401);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const elapsedSeconds = (Date.now() - started) / 1000;
  const fetched = reportsFetches() - fetchesBefore;
  assert.ok(fetched >= 1, 'the first refusal fetched a new token');
  assert.ok(fetched <= Math.ceil(elapsedSeconds / MIN_BACKOFF_SECONDS) + 1,
    `${fetched} token requests in ${elapsedSeconds} s with minBackoffSeconds ${MIN_BACKOFF_SECONDS}`);
  refuse = 'never';
});

test('a route that sends no response headers never renews on a 401', { skip }, async () => {
  await new Promise((resolve) => setTimeout(resolve, MIN_BACKOFF_SECONDS * 1000));
  refuse = 'always';
  const before = refusals();
  const fetchesBefore = stack.idp.tokenRequests.length;
  for (let i = 0; i < 5; i++) assert.equal((await send(`${stack.envoy.url}/orders/${i}`)).status, 401);
  refuse = 'never';
  assert.equal((await send(`${stack.envoy.url}/orders/ok`)).status, 200);
  assert.equal(refusals(), before);
  assert.equal(stack.idp.tokenRequests.length, fetchesBefore);
});
