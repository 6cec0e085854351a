// Real HTTP through the real Envoy running the shipped envoy/envoy.yaml (addresses rewritten
// only), the sidecar process, a real OAuth2 server and an echo backend. Everything is judged
// from the backend's side: what the application actually receives.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startSidecar } from '../helpers/sidecar.ts';
import { headerValues, type ReceivedRequest } from '../helpers/echo-backend.ts';
import { ENVOY_MISSING, eventually, findEnvoy } from '../helpers/envoy.ts';
import { bearer, defaultAndReports, FORGED, KEY, useStack } from '../helpers/e2e-stack.ts';

const skip = findEnvoy() === undefined && !process.env.CI ? ENVOY_MISSING : false;

const stack = useStack({
  skip,
  sidecar: ({ idp }) => startSidecar({ config: { profiles: defaultAndReports(idp) } }),
  envoy: { config: 'envoy.yaml' },
});
/** Sends one request through Envoy and returns what the backend received for it. */
const through = stack.exchange;

function assertNoKey(received: ReceivedRequest): void {
  assert.deepEqual(headerValues(received, 'ocp-apim-subscription-key'), []);
  // Nor anywhere else: the key's value is in no header the backend got.
  for (let i = 1; i < received.rawHeaders.length; i += 2) assert.ok(!received.rawHeaders[i]!.includes(KEY), received.rawHeaders[i - 1]);
}

test('the backend receives authorization: Bearer <a JWT that verifies against the IdP keys>', { skip }, async () => {
  const { received } = await through('/orders/42?expand=lines');
  assert.equal(received.url, '/orders/42?expand=lines');
  const claims = await stack.idp.verify(bearer(received));
  assert.equal(claims.sub, stack.idp.clients.post.clientId);
  assert.equal(claims.aud, 'https://upstream.test');
  assert.equal(claims.client_id, stack.idp.clients.post.clientId);
});

test('a client-sent Authorization never arrives: it is replaced, whatever its form or count', { skip }, async () => {
  for (const headers of [
    ['Authorization', FORGED],
    ['AUTHORIZATION', 'Basic Zm9yZ2VkOmZvcmdlZA=='],
    ['authorization', FORGED, 'Authorization', 'Bearer second.forged.value'],
  ]) {
    const { received } = await through('/orders', headers);
    const token = bearer(received);
    assert.ok(!token.includes('forged'), JSON.stringify(headers));
    await stack.idp.verify(token);
  }
});

test('Ocp-Apim-Subscription-Key never arrives, whatever its case, also when sent twice', { skip }, async () => {
  for (const headers of [
    ['Ocp-Apim-Subscription-Key', KEY],
    ['OCP-APIM-SUBSCRIPTION-KEY', KEY],
    ['ocp-apim-subscription-key', KEY],
    ['Ocp-Apim-Subscription-Key', KEY, 'OCP-APIM-SUBSCRIPTION-KEY', `${KEY}-2`],
    ['Ocp-Apim-Subscription-Key', KEY, 'Authorization', FORGED],
  ]) {
    const { received } = await through('/orders', headers);
    assertNoKey(received);
    await stack.idp.verify(bearer(received));
  }
});

test('a subscription key in the query string (?subscription-key=) never arrives either', { skip }, async () => {
  const { received } = await through(`/orders/42?expand=lines&subscription-key=${KEY}&page=2`);
  assert.equal(received.url, '/orders/42?expand=lines&page=2');
  assert.ok(!JSON.stringify(received).includes(KEY));
  await stack.idp.verify(bearer(received));
  // Percent-encoded, the name is the same parameter to a backend that decodes its query.
  const encoded = await through(`/orders/42?subscription%2Dkey=${KEY}&q=%2F`);
  assert.equal(encoded.received.url, '/orders/42?q=%2F');
  assert.ok(!JSON.stringify(encoded.received).includes(KEY));
  // So is the name in another case, for backends that read query names without regard to it.
  const cased = await through(`/orders/42?Subscription-Key=${KEY}`);
  assert.equal(cased.received.url, '/orders/42');
});

test('a request body passes through untouched (only headers go to the sidecar)', { skip }, async () => {
  const body = JSON.stringify({ order: 42, lines: ['a', 'b'] });
  const { received, body: echoed } = await through('/orders', ['content-type', 'application/json', 'Ocp-Apim-Subscription-Key', KEY], { method: 'POST', body });
  assert.equal(received.method, 'POST');
  assert.equal(received.headers['content-length'], String(Buffer.byteLength(body)));
  assert.equal(JSON.parse(echoed).method, 'POST');
  assertNoKey(received);
});

test('the /reports/ route (ExtProcPerRoute grpc_initial_metadata x-oauth2-profile) gets its own token', { skip }, async () => {
  const { received } = await through('/reports/monthly', ['Ocp-Apim-Subscription-Key', KEY, 'Authorization', FORGED]);
  const claims = await stack.idp.verify(bearer(received), 'https://reports.test');
  assert.equal(claims.sub, stack.idp.clients.basic.clientId);
  assert.equal(claims.aud, 'https://reports.test');
  assertNoKey(received);
  // …and the default route still gets the default profile's token.
  const other = await stack.idp.verify(bearer((await through('/orders')).received));
  assert.equal(other.sub, stack.idp.clients.post.clientId);
  assert.notEqual(other.sub, claims.sub);
});

test('/healthz skips the filter and still delivers no caller credentials', { skip }, async () => {
  const metric = async (): Promise<string> => (await (await fetch(`${stack.sidecar.adminUrl}/metrics`)).text())
    .split('\n').filter((l) => /^oauth2_extproc_requests_total\{/.test(l)).sort().join('\n');
  const before = await metric();
  assert.match(before, /outcome="injected"\} [1-9]/, 'earlier requests were counted');
  const { received } = await through('/healthz', ['Ocp-Apim-Subscription-Key', KEY, 'Authorization', FORGED]);
  assert.deepEqual(headerValues(received, 'authorization'), []);
  assertNoKey(received);
  assert.equal(await metric(), before, 'the sidecar saw no stream for /healthz');
  // With a query string the filter-less route does not match: the sidecar removes the key.
  const withKey = await through(`/healthz?subscription-key=${KEY}`);
  assert.equal(withKey.received.url, '/healthz');
  assert.ok(!JSON.stringify(withKey.received).includes(KEY));
  await stack.idp.verify(bearer(withKey.received));
});

test('Envoy counted every ext_proc stream as answered, none failed; its access log names the route outcome', { skip }, async () => {
  const stats = await stack.envoy.stats('ext_proc\\.');
  assert.ok((stats['http.ingress.ext_proc.streams_started'] ?? 0) > 0, JSON.stringify(stats));
  for (const name of ['streams_failed', 'message_timeouts', 'spurious_msgs_received', 'rejected_header_mutations', 'failure_mode_allowed']) {
    assert.equal(stats[`http.ingress.ext_proc.${name}`] ?? 0, 0, name);
  }
  // The path without its query string: a query may carry a subscription key.
  const line = await eventually('an access-log line', () => stack.envoy.accessLog.find((l) => l.includes('"path":"/orders/42"')));
  assert.deepEqual({ ...JSON.parse(line), time: undefined, duration_ms: undefined, request_id: undefined }, {
    method: 'GET', path: '/orders/42', status: 200, details: 'via_upstream', flags: '-', upstream: 'backend',
    time: undefined, duration_ms: undefined, request_id: undefined,
  });
});

test('no token, secret or subscription key in the sidecar log or the Envoy access log', { skip }, async () => {
  const token = bearer((await through('/orders')).received);
  const logs = [...stack.sidecar.stdout, ...stack.sidecar.stderr, ...stack.envoy.accessLog].join('\n');
  assert.ok(logs.length > 0);
  for (const secret of [token, token.split('.')[2]!, KEY, stack.idp.clients.post.clientSecret, stack.idp.clients.basic.clientSecret, 'forged']) {
    assert.ok(!logs.includes(secret), `a log line contains ${secret.slice(0, 12)}…`);
  }
});
