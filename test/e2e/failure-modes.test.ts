// What a client sees through the real Envoy (shipped envoy/envoy.yaml) when something is
// missing: no token (the token endpoint is down), a route naming a profile the sidecar lacks,
// no sidecar at all. Envoy must fail closed every time: the backend is never reached.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { denyReasons } from '../../src/errors.ts';
import { profileFor, startSidecar } from '../helpers/sidecar.ts';
import { headerValues } from '../helpers/echo-backend.ts';
import { ENVOY_MISSING, eventually, findEnvoy, send, type EnvoyProcess } from '../helpers/envoy.ts';
import { clustersWithoutSidecar, freePort as closedPort, useStack } from '../helpers/e2e-stack.ts';

const skip = findEnvoy() === undefined && !process.env.CI ? ENVOY_MISSING : false;
const KEY = 'caller-subscription-key-77aa';

/** The access-log line of the last request to `path`. */
function accessLine(envoy: EnvoyProcess, path: string): Promise<Record<string, unknown>> {
  return eventually(`an access-log line for ${path}`, () => {
    const line = envoy.accessLog.findLast((l) => l.includes(`"path":"${path}"`));
    return line === undefined ? undefined : JSON.parse(line) as Record<string, unknown>;
  });
}

describe('the token endpoint is down when the sidecar starts', { skip }, () => {
  const stack = useStack({
    idp: false,
    sidecar: async () => startSidecar({
      waitReady: false,
      config: {
        // Only `default`: the /reports/ route of envoy.yaml names a profile this sidecar lacks.
        profiles: { default: { tokenUrl: `http://127.0.0.1:${await closedPort()}/token`, clientId: 'orders', clientSecret: 'secret', scope: 'api://orders/.default' } },
      },
    }),
    envoy: { config: 'envoy.yaml' },
  });

  test("the client gets the sidecar's 503 with its JSON body; the backend gets nothing", async () => {
    const reply = await send(`${stack.envoy.url}/orders/1`, { headers: ['Ocp-Apim-Subscription-Key', KEY] });
    assert.equal(reply.status, 503);
    assert.equal(reply.headers['content-type'], 'application/json');
    assert.deepEqual(JSON.parse(reply.body), { error: denyReasons.noToken.code, message: denyReasons.noToken.message, profile: 'default' });
    assert.equal(stack.backend.tally.total, 0);
    const line = await accessLine(stack.envoy, '/orders/1');
    assert.equal(line.status, 503);
    assert.equal(line.details, 'oauth2_extproc_oauth2_err_no_token');
    // The admin endpoints say why.
    const ready = await fetch(`${stack.sidecar.adminUrl}/readyz`);
    assert.equal(ready.status, 503);
    assert.deepEqual((await ready.json() as { profiles: unknown }).profiles, { default: 'no_token' });
  });

  test('a denied request leaves no key in the access log, even one sent in the query string', async () => {
    const reply = await send(`${stack.envoy.url}/orders/2?subscription-key=${KEY}`, { headers: ['Ocp-Apim-Subscription-Key', KEY] });
    assert.equal(reply.status, 503);
    const line = await accessLine(stack.envoy, '/orders/2');
    assert.equal(line.status, 503);
    assert.ok(!stack.envoy.accessLog.join('\n').includes(KEY));
    assert.equal(stack.backend.tally.total, 0);
  });

  test('a route naming a profile the sidecar does not have gets a 500 that says so', async () => {
    const reply = await send(`${stack.envoy.url}/reports/monthly`, { headers: ['Ocp-Apim-Subscription-Key', KEY] });
    assert.equal(reply.status, 500);
    assert.equal(reply.headers['content-type'], 'application/json');
    const body = JSON.parse(reply.body) as Record<string, unknown>;
    assert.equal(body.error, denyReasons.unknownProfile.code);
    assert.equal(body.message, denyReasons.unknownProfile.message);
    assert.equal(stack.backend.tally.total, 0);
    assert.equal((await accessLine(stack.envoy, '/reports/monthly')).details, 'oauth2_extproc_oauth2_err_unknown_profile');
    await stack.sidecar.waitForLog((r) => r.level === 'warn' && r.profile === 'reports');
  });

  test('/healthz still reaches the backend (the filter is off there)', async () => {
    const reply = await send(`${stack.envoy.url}/healthz`, { headers: ['Ocp-Apim-Subscription-Key', KEY] });
    assert.equal(reply.status, 200);
    assert.equal(stack.backend.tally.total, 1);
    assert.deepEqual(headerValues(stack.backend.requests[0]!, 'ocp-apim-subscription-key'), []);
  });
});

describe('the token endpoint fails at start, then recovers', { skip }, () => {
  const stack = useStack({
    sidecar: ({ idp }) => {
      idp.override(
        { status: 503, headers: { 'content-type': 'application/json' }, body: '{"error":"temporarily_unavailable"}' },
        { status: 503, headers: { 'content-type': 'application/json' }, body: '{"error":"temporarily_unavailable"}' },
      );
      return startSidecar({
        waitReady: false,
        config: { profiles: { default: profileFor(idp, { refresh: { minBackoffSeconds: 0.2, maxBackoffSeconds: 0.5 } }) } },
      });
    },
    envoy: { config: 'envoy.yaml' },
  });

  test('requests are denied until a token arrives, then carry it; none ever reaches the backend without one', async () => {
    // Until the retries get through, every answer is the sidecar's 503; after, a 200.
    const statuses = new Set<number>();
    const reply = await eventually('a request to succeed', async () => {
      const r = await send(`${stack.envoy.url}/orders/1`, { headers: ['Ocp-Apim-Subscription-Key', KEY] });
      statuses.add(r.status);
      return r.status === 200 ? r : undefined;
    }, 15_000);
    assert.equal(reply.status, 200);
    assert.ok([...statuses].every((s) => s === 200 || s === 503), [...statuses].join(','));
    assert.ok(stack.idp.tokenRequests.length >= 3, 'two failures, then a token');
    for (const received of stack.backend.requests) {
      await stack.idp.verify(headerValues(received, 'authorization')[0]!.replace(/^Bearer /, ''));
      assert.deepEqual(headerValues(received, 'ocp-apim-subscription-key'), []);
    }
  });
});

describe('the sidecar is not running', { skip }, () => {
  const stack = useStack({
    idp: false,
    envoy: { config: 'envoy.yaml', clusters: clustersWithoutSidecar },
  });

  test('Envoy fails closed: a 500, the backend never reached', async () => {
    for (const path of ['/orders/1', '/reports/monthly']) {
      const reply = await send(`${stack.envoy.url}${path}`, { headers: ['Ocp-Apim-Subscription-Key', KEY, 'Authorization', 'Bearer forged'] });
      assert.equal(reply.status, 500, path);
      const line = await accessLine(stack.envoy, path);
      // gRPC status 14 (UNAVAILABLE): nothing listens on the sidecar's address.
      assert.match(String(line.details), /^ext_proc_error_gRPC_error_14/, JSON.stringify(line));
    }
    assert.equal(stack.backend.tally.total, 0);
  });

  test('the route that disables the filter works without the sidecar', async () => {
    const reply = await send(`${stack.envoy.url}/healthz`, { headers: ['Ocp-Apim-Subscription-Key', KEY, 'Authorization', 'Bearer forged'] });
    assert.equal(reply.status, 200);
    assert.equal(stack.backend.tally.total, 1);
    assert.deepEqual(headerValues(stack.backend.requests[0]!, 'authorization'), []);
    assert.deepEqual(headerValues(stack.backend.requests[0]!, 'ocp-apim-subscription-key'), []);
  });
});
