// ext_authz mode through the real Envoy running the shipped envoy/envoy-ext-authz.yaml (addresses
// rewritten only): the sidecar answers each Check with the token header to set and the key
// headers and query parameters to remove, or the deny. Judged from the backend's side.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { startSidecar } from '../helpers/sidecar.ts';
import { headerValues } from '../helpers/echo-backend.ts';
import { ENVOY_MISSING, eventually, findEnvoy, send } from '../helpers/envoy.ts';
import { assertNoKey, bearer, clustersWithoutSidecar, defaultAndReports, FORGED, freePort as closedPort, KEY, useStack } from '../helpers/e2e-stack.ts';

const skip = findEnvoy() === undefined && !process.env.CI ? ENVOY_MISSING : false;

describe('ext_authz with tokens', { skip }, () => {
  const stack = useStack({
    sidecar: ({ idp }) => startSidecar({ config: { profiles: defaultAndReports(idp) } }),
    envoy: { config: 'envoy-ext-authz.yaml' },
  });
  const { through } = stack;

  test('the token is set, and replaces what the caller sent, whatever its form or count', async () => {
    for (const headers of [[], ['Authorization', FORGED], ['authorization', FORGED, 'AUTHORIZATION', 'Basic Zm9yZ2Vk']]) {
      const received = await through('/orders/42?expand=lines', headers);
      assert.equal(received.url, '/orders/42?expand=lines');
      const claims = await stack.idp.verify(bearer(received));
      assert.equal(claims.sub, stack.idp.clients.post.clientId);
    }
  });

  test('the key header never arrives, in any case or count', async () => {
    for (const headers of [['Ocp-Apim-Subscription-Key', KEY], ['OCP-APIM-SUBSCRIPTION-KEY', KEY, 'ocp-apim-subscription-key', `${KEY}-2`]]) {
      assertNoKey(await through('/orders', headers));
    }
  });

  test('the query parameters are removed under each spelling the request carries, the others kept', async () => {
    assert.equal((await through(`/orders/42?expand=lines&subscription-key=${KEY}&page=2`)).url, '/orders/42?expand=lines&page=2');
    for (const name of ['Subscription-Key', 'subscription%2Dkey', 'SUBSCRIPTION-KEY', 'subscription-key[]']) {
      const received = await through(`/orders/42?${name}=${KEY}&q=1`);
      assert.ok(!received.url.includes(KEY), `${name}: ${received.url}`);
      assert.match(received.url, /q=1/);
    }
    // Twice, in two spellings.
    const twice = await through(`/orders?subscription-key=${KEY}&Subscription-Key=${KEY}`);
    assert.ok(!twice.url.includes(KEY), twice.url);
  });

  test('the /reports/ route (context extension x-oauth2-profile) gets its own token', async () => {
    const received = await through('/reports/monthly', ['Ocp-Apim-Subscription-Key', KEY, 'Authorization', FORGED]);
    const claims = await stack.idp.verify(bearer(received), 'https://reports.test');
    assert.equal(claims.sub, stack.idp.clients.basic.clientId);
    assertNoKey(received);
  });
});

describe('ext_authz denies', { skip }, () => {
  // A token endpoint nobody listens on (no token, ever), and no `reports` profile at all.
  const stack = useStack({
    idp: false,
    sidecar: async () => startSidecar({
      waitReady: false,
      config: { profiles: { default: { tokenUrl: `http://127.0.0.1:${await closedPort()}/token`, clientId: 'orders', clientSecret: 'secret', scope: 'api://orders/.default' } } },
    }),
    envoy: { config: 'envoy-ext-authz.yaml' },
  });

  test('no token: the profile\'s status and the JSON body of ext_proc mode; the backend never reached', async () => {
    const reply = await send(`${stack.envoy.url}/orders/1`, { headers: ['Ocp-Apim-Subscription-Key', KEY] });
    assert.equal(reply.status, 503);
    assert.equal(reply.headers['content-type'], 'application/json');
    assert.equal(reply.headers['cache-control'], 'no-store');
    assert.deepEqual(JSON.parse(reply.body), { error: 'OAUTH2_ERR_NO_TOKEN', message: 'no usable access token for this profile', profile: 'default' });
    assert.equal(stack.backend.tally.total, 0);
  });

  test('a route naming an unknown profile: 500 with the unknown-profile body', async () => {
    const reply = await send(`${stack.envoy.url}/reports/monthly`);
    assert.equal(reply.status, 500);
    assert.deepEqual(JSON.parse(reply.body), { error: 'OAUTH2_ERR_UNKNOWN_PROFILE', message: 'the stream names a profile that is not configured', profile: 'reports' });
    assert.equal(stack.backend.tally.total, 0);
    await stack.sidecar.waitForLog((r) => r.profile === 'reports' && /not configured/.test(r.msg));
  });
});

describe('ext_authz with the sidecar down', { skip }, () => {
  const stack = useStack({
    idp: false,
    envoy: { config: 'envoy-ext-authz.yaml', clusters: clustersWithoutSidecar },
  });

  test('Envoy fails closed (503), the backend never reached; the filter-less /healthz still works', async () => {
    for (const path of ['/orders/1', '/reports/monthly']) {
      const reply = await send(`${stack.envoy.url}${path}`, { headers: ['Ocp-Apim-Subscription-Key', KEY, 'Authorization', FORGED] });
      assert.equal(reply.status, 503, path);
    }
    assert.equal(stack.backend.tally.total, 0);
    const line = await eventually('the access-log line', () => stack.envoy.accessLog.find((l) => l.includes('"path":"/orders/1"')));
    assert.match(line, /"flags":"UAEX"/); // unauthorized by the external authorization service (here: unreachable)
    const health = await send(`${stack.envoy.url}/healthz`, { headers: ['Ocp-Apim-Subscription-Key', KEY, 'Authorization', FORGED] });
    assert.equal(health.status, 200);
    assert.deepEqual(headerValues(stack.backend.requests[0]!, 'authorization'), []);
  });
});
