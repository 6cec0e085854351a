// SDS mode through the real Envoy running the shipped envoy/envoy-sds.yaml (addresses rewritten
// only): the sidecar serves each profile's header value as a generic secret, Envoy's own
// credential_injector puts it on the request and header_mutation removes the key. Judged from
// the backend's side, with a real OAuth2 server issuing short-lived tokens.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { startOAuthServer, type OAuthServer } from '../helpers/oauth-server.ts';
import { profileFor, startSidecar, type SidecarProcess } from '../helpers/sidecar.ts';
import { headerValues, startEchoBackend, type EchoBackend, type ReceivedRequest } from '../helpers/echo-backend.ts';
import { ENVOY_MISSING, eventually, findEnvoy, send, startEnvoy, type EnvoyProcess } from '../helpers/envoy.ts';

const skip = findEnvoy() === undefined && !process.env.CI ? ENVOY_MISSING : false;
const KEY = 'caller-subscription-key-5f2c9a';
const FORGED = 'Bearer forged.by.the-caller';

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

function bearer(received: ReceivedRequest): string {
  const values = headerValues(received, 'authorization');
  assert.equal(values.length, 1, `one authorization header: ${JSON.stringify(values)}`);
  const m = /^Bearer (\S+)$/.exec(values[0]!);
  assert.ok(m, 'Bearer <token>');
  return m[1]!;
}

function assertNoKey(received: ReceivedRequest): void {
  assert.deepEqual(headerValues(received, 'ocp-apim-subscription-key'), []);
  assert.ok(!JSON.stringify(received).includes(KEY), JSON.stringify(received));
}

/** The JWT's claims, read without verifying (only to know when it expires). */
function claims(token: string): Record<string, any> {
  return JSON.parse(Buffer.from(token.split('.')[1]!, 'base64url').toString('utf8'));
}

/** The access-log line of the last request to `path` answered with `status`. */
function accessLine(envoy: EnvoyProcess, path: string, status: number): Promise<Record<string, unknown>> {
  return eventually(`an access-log line for ${path} with ${status}`, () => {
    const line = envoy.accessLog.findLast((l) => l.includes(`"path":"${path}"`) && l.includes(`"status":${status}`));
    return line === undefined ? undefined : JSON.parse(line) as Record<string, unknown>;
  });
}

/** Starts the sidecar on fixed ports (so a restarted one is found at the same place). */
async function sidecarOn(idp: OAuthServer, ports: { grpc: number; admin: number }, profiles: Record<string, any>): Promise<SidecarProcess> {
  return startSidecar({
    waitReady: false,
    config: { server: { grpc: `127.0.0.1:${ports.grpc}`, admin: `127.0.0.1:${ports.admin}` }, profiles },
  });
}

/** Requests until the backend has seen three different tokens (each refresh pushed over SDS), all valid. */
async function threeTokensReachTheBackend(envoy: EnvoyProcess, backend: EchoBackend, idp: OAuthServer): Promise<void> {
  const tokens = new Set<string>();
  await eventually('three tokens at the backend', async () => {
    const r = await send(`${envoy.url}/orders/1`);
    assert.equal(r.status, 200, r.body);
    tokens.add(bearer(backend.requests.at(-1)!));
    return tokens.size >= 3 ? true : undefined;
  }, 15_000);
  for (const token of tokens) await idp.verify(token);
}

function envoyFor(ports: { grpc: number; admin: number }, backend: EchoBackend, variant?: (config: any) => void): Promise<EnvoyProcess> {
  return startEnvoy({
    config: 'envoy-sds.yaml',
    variant,
    clusters: {
      oauth2_extproc: `127.0.0.1:${ports.grpc}`,
      backend: { address: backend.address, healthCheck: `127.0.0.1:${ports.admin}` },
    },
  });
}

describe('tokens over SDS, refreshed every second or so', { skip }, () => {
  let idp: OAuthServer;
  let backend: EchoBackend;
  let sidecar: SidecarProcess;
  let envoy: EnvoyProcess;

  before(async () => {
    // 4 s tokens: with the default margin the sidecar uses each for 2 s and refreshes after ~1 s.
    idp = await startOAuthServer({ ttlSeconds: 4 });
    backend = await startEchoBackend();
    const ports = { grpc: await freePort(), admin: await freePort() };
    sidecar = await sidecarOn(idp, ports, {
      default: profileFor(idp),
      reports: profileFor(idp, {
        clientId: idp.clients.basic.clientId,
        clientSecret: idp.clients.basic.clientSecret,
        clientAuth: 'client_secret_basic',
        resource: 'https://reports.test',
      }),
    });
    await sidecar.waitForLog((r) => typeof r.msg === 'string' && r.msg.startsWith('ready'));
    envoy = await envoyFor(ports, backend);
  });

  after(async () => {
    await envoy?.stop();
    await sidecar?.stop();
    await backend?.close();
    await idp?.close();
  });

  async function through(path: string, headers: string[] = []): Promise<ReceivedRequest> {
    const before = backend.tally.total;
    const reply = await send(`${envoy.url}${path}`, { headers });
    assert.equal(reply.status, 200, reply.body);
    assert.equal(backend.tally.total, before + 1, 'exactly one request reached the backend');
    return backend.requests.at(-1)!;
  }

  test('the backend receives the profile\'s token in place of the caller\'s, and no key', async () => {
    const received = await through('/orders/42?expand=lines', ['Authorization', FORGED, 'Ocp-Apim-Subscription-Key', KEY]);
    assert.equal(received.url, '/orders/42?expand=lines');
    const c = await idp.verify(bearer(received));
    assert.equal(c.sub, idp.clients.post.clientId);
    assert.equal(c.aud, 'https://upstream.test');
    assertNoKey(received);
  });

  test('a refreshed token reaches the backend without restarting Envoy', async () => {
    const first = bearer(await through('/orders/1'));
    const next = await eventually('a newer token at the backend', async () => {
      const token = bearer(await through('/orders/1'));
      return token !== first ? token : undefined;
    }, 10_000);
    await idp.verify(next);
    assert.ok(claims(next).iat >= claims(first).iat);
  });

  test('?subscription-key= and its percent-encoded form are removed, the other parameters kept', async () => {
    assert.equal((await through(`/orders/42?expand=lines&subscription-key=${KEY}&page=2`)).url, '/orders/42?expand=lines&page=2');
    const encoded = await through(`/orders/42?subscription%2Dkey=${KEY}&q=%2F`);
    assert.ok(!encoded.url.includes(KEY), encoded.url);
  });

  test('what this mode trades (docs/modes.md): ?Subscription-Key= in another case passes Envoy\'s header_mutation', async () => {
    const received = await through(`/orders/42?Subscription-Key=${KEY}`);
    assert.equal(received.url, `/orders/42?Subscription-Key=${KEY}`);
  });

  test('a header name with `_` (read as the key by CGI, PHP and WSGI) is refused by Envoy', async () => {
    const before = backend.tally.total;
    const reply = await send(`${envoy.url}/orders/1`, { headers: ['ocp_apim_subscription_key', KEY] });
    assert.equal(reply.status, 400);
    assert.equal(backend.tally.total, before);
  });

  test('the /reports/ route gets the reports profile\'s token, the others the default one', async () => {
    const reports = await idp.verify(bearer(await through('/reports/monthly', ['Authorization', FORGED, 'Ocp-Apim-Subscription-Key', KEY])), 'https://reports.test');
    assert.equal(reports.sub, idp.clients.basic.clientId);
    const other = await idp.verify(bearer(await through('/orders')));
    assert.equal(other.sub, idp.clients.post.clientId);
  });

  test('the bare /healthz route needs no token and drops the caller\'s credentials', async () => {
    const received = await through('/healthz', ['Authorization', FORGED, 'Ocp-Apim-Subscription-Key', KEY]);
    assert.deepEqual(headerValues(received, 'authorization'), []);
    assertNoKey(received);
  });
});

describe('a profile without a usable token fails closed (Envoy answers 401 itself)', { skip }, () => {
  let idp: OAuthServer;
  let backend: EchoBackend;
  let sidecar: SidecarProcess;
  let envoy: EnvoyProcess;

  before(async () => {
    idp = await startOAuthServer({ ttlSeconds: 4 });
    backend = await startEchoBackend();
    const ports = { grpc: await freePort(), admin: await freePort() };
    sidecar = await sidecarOn(idp, ports, {
      default: profileFor(idp, { refresh: { minBackoffSeconds: 0.2, maxBackoffSeconds: 0.5 } }),
      // A client the IdP refuses: this profile never holds a token.
      reports: profileFor(idp, { clientSecret: 'not-the-secret', refresh: { minBackoffSeconds: 1, maxBackoffSeconds: 2 } }),
    });
    await sidecar.waitForLog((r) => r.msg === 'token fetched' && r.profile === 'default');
    envoy = await envoyFor(ports, backend);
  });

  after(async () => {
    await envoy?.stop();
    await sidecar?.stop();
    await backend?.close();
    await idp?.close();
  });

  test('a profile that never got a token: 401 on its route, the other profile still served', async () => {
    const reply = await send(`${envoy.url}/reports/monthly`, { headers: ['Authorization', FORGED, 'Ocp-Apim-Subscription-Key', KEY] });
    assert.equal(reply.status, 401, reply.body);
    assert.equal((await accessLine(envoy, '/reports/monthly', 401)).details, 'failed_to_inject_credential');
    assert.equal(backend.tally.total, 0);
    const ok = await send(`${envoy.url}/orders/1`);
    assert.equal(ok.status, 200);
    assert.equal(backend.tally.total, 1);
  });

  test('a token that expires with no new one: the secret is emptied and Envoy answers 401', async () => {
    // Every token request fails from now on (for ~20 s of retries); the held token ends 2 s after it was fetched.
    const failure = { status: 503, headers: { 'content-type': 'application/json' }, body: '{"error":"temporarily_unavailable"}' };
    idp.override(...Array.from({ length: 200 }, () => failure));
    const before = backend.tally.total;
    const reply = await eventually('a 401 from Envoy', async () => {
      const r = await send(`${envoy.url}/orders/2`, { headers: ['Ocp-Apim-Subscription-Key', KEY] });
      return r.status === 401 ? r : undefined;
    }, 10_000);
    assert.equal(reply.status, 401);
    assert.equal((await accessLine(envoy, '/orders/2', 401)).details, 'failed_to_inject_credential');
    // Every request that did reach the backend carried a token still valid on arrival.
    for (const received of backend.requests.slice(before)) {
      assert.ok(claims(bearer(received)).exp * 1000 > Date.now() - 5000);
      assertNoKey(received);
    }
    idp.override(undefined);
  });
});

describe('the sidecar dies: restarts go unnoticed, a dead one takes Envoy out of service before its token expires', { skip }, () => {
  let idp: OAuthServer;
  let backend: EchoBackend;
  let sidecar: SidecarProcess;
  let envoy: EnvoyProcess;
  let ports: { grpc: number; admin: number };
  const profiles = (idp: OAuthServer) => ({ default: profileFor(idp), reports: profileFor(idp, { resource: 'https://reports.test' }) });

  before(async () => {
    // Tokens that outlive the ~15 s Envoy needs to notice: 60 s, used for 30 s.
    idp = await startOAuthServer({ ttlSeconds: 60 });
    backend = await startEchoBackend();
    ports = { grpc: await freePort(), admin: await freePort() };
    sidecar = await sidecarOn(idp, ports, profiles(idp));
    await sidecar.waitForLog((r) => typeof r.msg === 'string' && r.msg.startsWith('ready'));
    envoy = await envoyFor(ports, backend);
  });

  after(async () => {
    await envoy?.stop();
    await sidecar?.stop('SIGKILL');
    await backend?.close();
    await idp?.close();
  });

  test('a sidecar killed and started again: not one request fails meanwhile', async () => {
    assert.equal((await send(`${envoy.url}/orders/1`)).status, 200);
    await sidecar.stop('SIGKILL');
    const statuses: number[] = [];
    const restarted = sidecarOn(idp, ports, profiles(idp));
    let done = false;
    const traffic = (async () => {
      while (!done) statuses.push((await send(`${envoy.url}/orders/1`)).status);
    })();
    sidecar = await restarted;
    await sidecar.waitForLog((r) => typeof r.msg === 'string' && r.msg.startsWith('ready'));
    // Envoy's SDS stream comes back (its retry backoff) and takes the new sidecar's token.
    const fresh = await eventually('the restarted sidecar\'s token at the backend', async () => {
      const before = backend.tally.total;
      const r = await send(`${envoy.url}/orders/1`);
      if (r.status !== 200 || backend.tally.total !== before + 1) return undefined;
      const token = bearer(backend.requests.at(-1)!);
      return idp.tokenRequests.length >= 4 && claims(token).iat * 1000 >= Date.now() - 30_000 ? token : undefined;
    }, 20_000);
    done = true;
    await traffic;
    await idp.verify(fresh);
    assert.ok(statuses.length > 0);
    assert.deepEqual([...new Set(statuses)], [200]);
  });

  test('a sidecar that stays dead: Envoy stops forwarding (503) while its last token is still valid', async () => {
    const before = backend.tally.total;
    assert.equal((await send(`${envoy.url}/orders/1`)).status, 200);
    const lastToken = bearer(backend.requests.at(-1)!);
    const expiresAt = claims(lastToken).exp * 1000;
    await sidecar.stop('SIGKILL');
    const killedAt = Date.now();
    const reply = await eventually('Envoy to stop forwarding', async () => {
      const r = await send(`${envoy.url}/orders/1`, { headers: ['Ocp-Apim-Subscription-Key', KEY] });
      return r.status === 200 ? undefined : r;
    }, 40_000);
    const stoppedAt = Date.now();
    assert.equal(reply.status, 503);
    const line = await accessLine(envoy, '/orders/1', 503);
    assert.deepEqual([line.flags, line.details], ['UH', 'no_healthy_upstream']);
    // The property that matters: Envoy stopped before the token it still holds expired.
    assert.ok(stoppedAt < expiresAt, `stopped ${(stoppedAt - killedAt) / 1000} s after the kill, token expiring ${(expiresAt - killedAt) / 1000} s after it`);
    console.log(`# Envoy stopped forwarding ${(stoppedAt - killedAt) / 1000} s after the sidecar was killed; its last token expired ${(expiresAt - killedAt) / 1000} s after`);
    // Until then, what reached the backend carried the last token, never the caller's key.
    for (const received of backend.requests.slice(before)) {
      assert.equal(bearer(received), lastToken);
      assertNoKey(received);
    }
    // Every route, /healthz included: this Envoy is out of service.
    assert.equal((await send(`${envoy.url}/reports/x`)).status, 503);
    assert.equal((await send(`${envoy.url}/healthz`)).status, 503);
  });
});

describe('with server.workers: 2, the worker holding Envoy\'s SDS stream pushes the primary\'s refreshed tokens', { skip }, () => {
  let idp: OAuthServer;
  let backend: EchoBackend;
  let sidecar: SidecarProcess;
  let envoy: EnvoyProcess;

  before(async () => {
    idp = await startOAuthServer({ ttlSeconds: 4 });
    backend = await startEchoBackend();
    const ports = { grpc: await freePort(), admin: await freePort() };
    sidecar = await startSidecar({
      waitReady: false,
      config: { server: { grpc: `127.0.0.1:${ports.grpc}`, admin: `127.0.0.1:${ports.admin}`, workers: 2 }, profiles: { default: profileFor(idp), reports: profileFor(idp, { resource: 'https://reports.test' }) } },
    });
    await sidecar.waitForLog((r) => typeof r.msg === 'string' && r.msg.startsWith('ready'));
    envoy = await envoyFor(ports, backend);
  });

  after(async () => {
    await envoy?.stop();
    await sidecar?.stop();
    await backend?.close();
    await idp?.close();
  });

  test('a token refreshed by the primary reaches the backend', async () => {
    await threeTokensReachTheBackend(envoy, backend, idp);
  });
});

describe('with api_type DELTA_GRPC (docs/modes.md), tokens and refreshes arrive over delta xDS', { skip }, () => {
  let idp: OAuthServer;
  let backend: EchoBackend;
  let sidecar: SidecarProcess;
  let envoy: EnvoyProcess;

  before(async () => {
    idp = await startOAuthServer({ ttlSeconds: 4 });
    backend = await startEchoBackend();
    const ports = { grpc: await freePort(), admin: await freePort() };
    sidecar = await sidecarOn(idp, ports, { default: profileFor(idp), reports: profileFor(idp, { resource: 'https://reports.test' }) });
    await sidecar.waitForLog((r) => typeof r.msg === 'string' && r.msg.startsWith('ready'));
    let left = '';
    envoy = await envoyFor(ports, backend, (config) => {
      JSON.stringify(config, (key, value) => {
        if (key === 'api_config_source' && value.api_type === 'GRPC') value.api_type = 'DELTA_GRPC';
        return value;
      });
      left = JSON.stringify(config);
    });
    // Both profiles' sds_config (one YAML anchor) now say DELTA_GRPC.
    assert.equal((left.match(/"api_type":"DELTA_GRPC"/g) ?? []).length, 2);
    assert.ok(!left.includes('"api_type":"GRPC"'));
  });

  after(async () => {
    await envoy?.stop();
    await sidecar?.stop();
    await backend?.close();
    await idp?.close();
  });

  test('three successive tokens reach the backend, each profile on its route', async () => {
    await threeTokensReachTheBackend(envoy, backend, idp);
    assert.equal((await send(`${envoy.url}/reports/1`)).status, 200);
    await idp.verify(bearer(backend.requests.at(-1)!), 'https://reports.test');
    const stats = await envoy.stats('^sds\\.');
    assert.equal(stats['sds.default.update_rejected'], 0);
    assert.ok(stats['sds.default.update_success']! >= 3, JSON.stringify(stats));
  });
});
