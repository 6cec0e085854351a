// What a client sees through the real Envoy (shipped envoy/envoy.yaml) when something is
// missing: no token (the token endpoint is down), a route naming a profile the sidecar lacks,
// no sidecar at all. Envoy must fail closed every time: the backend is never reached.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { denyReasons } from '../../src/errors.ts';
import { startOAuthServer, type OAuthServer } from '../helpers/oauth-server.ts';
import { profileFor, startSidecar, type SidecarProcess } from '../helpers/sidecar.ts';
import { headerValues, startEchoBackend, type EchoBackend } from '../helpers/echo-backend.ts';
import { ENVOY_MISSING, eventually, findEnvoy, send, startEnvoy, type EnvoyProcess } from '../helpers/envoy.ts';

const skip = findEnvoy() === undefined && !process.env.CI ? ENVOY_MISSING : false;
const KEY = 'caller-subscription-key-77aa';

/** A 127.0.0.1 port with nothing listening on it (bound, then released). */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** The access-log line of the last request to `path`. */
function accessLine(envoy: EnvoyProcess, path: string): Promise<Record<string, unknown>> {
  return eventually(`an access-log line for ${path}`, () => {
    const line = envoy.accessLog.findLast((l) => l.includes(`"path":"${path}"`));
    return line === undefined ? undefined : JSON.parse(line) as Record<string, unknown>;
  });
}

describe('the token endpoint is down when the sidecar starts', { skip }, () => {
  let backend: EchoBackend;
  let sidecar: SidecarProcess;
  let envoy: EnvoyProcess;

  before(async () => {
    backend = await startEchoBackend();
    sidecar = await startSidecar({
      waitReady: false,
      config: {
        // Only `default`: the /reports/ route of envoy.yaml names a profile this sidecar lacks.
        profiles: { default: { tokenUrl: `http://127.0.0.1:${await closedPort()}/token`, clientId: 'orders', clientSecret: 'secret', scope: 'api://orders/.default' } },
      },
    });
    envoy = await startEnvoy({ config: 'envoy.yaml', clusters: { oauth2_extproc: sidecar.grpcAddress, backend: backend.address } });
  });
  after(async () => {
    await envoy?.stop();
    await sidecar?.stop();
    await backend?.close();
  });

  test("the client gets the sidecar's 503 with its JSON body; the backend gets nothing", async () => {
    const reply = await send(`${envoy.url}/orders/1`, { headers: ['Ocp-Apim-Subscription-Key', KEY] });
    assert.equal(reply.status, 503);
    assert.equal(reply.headers['content-type'], 'application/json');
    assert.deepEqual(JSON.parse(reply.body), { error: denyReasons.noToken.code, message: denyReasons.noToken.message, profile: 'default' });
    assert.equal(backend.tally.total, 0);
    const line = await accessLine(envoy, '/orders/1');
    assert.equal(line.status, 503);
    assert.equal(line.details, 'oauth2_extproc_oauth2_err_no_token');
    // The admin endpoints say why.
    const ready = await fetch(`${sidecar.adminUrl}/readyz`);
    assert.equal(ready.status, 503);
    assert.deepEqual((await ready.json() as { profiles: unknown }).profiles, { default: 'no_token' });
  });

  test('a denied request leaves no key in the access log, even one sent in the query string', async () => {
    const reply = await send(`${envoy.url}/orders/2?subscription-key=${KEY}`, { headers: ['Ocp-Apim-Subscription-Key', KEY] });
    assert.equal(reply.status, 503);
    const line = await accessLine(envoy, '/orders/2');
    assert.equal(line.status, 503);
    assert.ok(!envoy.accessLog.join('\n').includes(KEY));
    assert.equal(backend.tally.total, 0);
  });

  test('a route naming a profile the sidecar does not have gets a 500 that says so', async () => {
    const reply = await send(`${envoy.url}/reports/monthly`, { headers: ['Ocp-Apim-Subscription-Key', KEY] });
    assert.equal(reply.status, 500);
    assert.equal(reply.headers['content-type'], 'application/json');
    const body = JSON.parse(reply.body) as Record<string, unknown>;
    assert.equal(body.error, denyReasons.unknownProfile.code);
    assert.equal(body.message, denyReasons.unknownProfile.message);
    assert.equal(backend.tally.total, 0);
    assert.equal((await accessLine(envoy, '/reports/monthly')).details, 'oauth2_extproc_oauth2_err_unknown_profile');
    await sidecar.waitForLog((r) => r.level === 'warn' && r.profile === 'reports');
  });

  test('/healthz still reaches the backend (the filter is off there)', async () => {
    const reply = await send(`${envoy.url}/healthz`, { headers: ['Ocp-Apim-Subscription-Key', KEY] });
    assert.equal(reply.status, 200);
    assert.equal(backend.tally.total, 1);
    assert.deepEqual(headerValues(backend.requests[0]!, 'ocp-apim-subscription-key'), []);
  });
});

describe('the token endpoint fails at start, then recovers', { skip }, () => {
  let idp: OAuthServer;
  let backend: EchoBackend;
  let sidecar: SidecarProcess;
  let envoy: EnvoyProcess;

  before(async () => {
    idp = await startOAuthServer();
    idp.override(
      { status: 503, headers: { 'content-type': 'application/json' }, body: '{"error":"temporarily_unavailable"}' },
      { status: 503, headers: { 'content-type': 'application/json' }, body: '{"error":"temporarily_unavailable"}' },
    );
    backend = await startEchoBackend();
    sidecar = await startSidecar({
      waitReady: false,
      config: { profiles: { default: profileFor(idp, { refresh: { minBackoffSeconds: 0.2, maxBackoffSeconds: 0.5 } }) } },
    });
    envoy = await startEnvoy({ config: 'envoy.yaml', clusters: { oauth2_extproc: sidecar.grpcAddress, backend: backend.address } });
  });
  after(async () => {
    await envoy?.stop();
    await sidecar?.stop();
    await backend?.close();
    await idp?.close();
  });

  test('requests are denied until a token arrives, then carry it; none ever reaches the backend without one', async () => {
    // Until the retries get through, every answer is the sidecar's 503; after, a 200.
    const statuses = new Set<number>();
    const reply = await eventually('a request to succeed', async () => {
      const r = await send(`${envoy.url}/orders/1`, { headers: ['Ocp-Apim-Subscription-Key', KEY] });
      statuses.add(r.status);
      return r.status === 200 ? r : undefined;
    }, 15_000);
    assert.equal(reply.status, 200);
    assert.ok([...statuses].every((s) => s === 200 || s === 503), [...statuses].join(','));
    assert.ok(idp.tokenRequests.length >= 3, 'two failures, then a token');
    for (const received of backend.requests) {
      await idp.verify(headerValues(received, 'authorization')[0]!.replace(/^Bearer /, ''));
      assert.deepEqual(headerValues(received, 'ocp-apim-subscription-key'), []);
    }
  });
});

describe('the sidecar is not running', { skip }, () => {
  let backend: EchoBackend;
  let envoy: EnvoyProcess;

  before(async () => {
    backend = await startEchoBackend();
    envoy = await startEnvoy({ config: 'envoy.yaml', clusters: { oauth2_extproc: `127.0.0.1:${await closedPort()}`, backend: backend.address } });
  });
  after(async () => {
    await envoy?.stop();
    await backend?.close();
  });

  test('Envoy fails closed: a 500, the backend never reached', async () => {
    for (const path of ['/orders/1', '/reports/monthly']) {
      const reply = await send(`${envoy.url}${path}`, { headers: ['Ocp-Apim-Subscription-Key', KEY, 'Authorization', 'Bearer forged'] });
      assert.equal(reply.status, 500, path);
      const line = await accessLine(envoy, path);
      // gRPC status 14 (UNAVAILABLE): nothing listens on the sidecar's address.
      assert.match(String(line.details), /^ext_proc_error_gRPC_error_14/, JSON.stringify(line));
    }
    assert.equal(backend.tally.total, 0);
  });

  test('the route that disables the filter works without the sidecar', async () => {
    const reply = await send(`${envoy.url}/healthz`, { headers: ['Ocp-Apim-Subscription-Key', KEY, 'Authorization', 'Bearer forged'] });
    assert.equal(reply.status, 200);
    assert.equal(backend.tally.total, 1);
    assert.deepEqual(headerValues(backend.requests[0]!, 'authorization'), []);
    assert.deepEqual(headerValues(backend.requests[0]!, 'ocp-apim-subscription-key'), []);
  });
});
