// SDS mode through the real Envoy running the shipped envoy/envoy-sds.yaml (addresses rewritten
// only): the sidecar serves each profile's header value as a generic secret, Envoy's own
// credential_injector puts it on the request and header_mutation removes the key. Judged from
// the backend's side, with a real OAuth2 server issuing short-lived tokens.
import { before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { OAuthServer } from '../helpers/oauth-server.ts';
import { profileFor, startSidecar, type SidecarProcess } from '../helpers/sidecar.ts';
import { headerValues } from '../helpers/echo-backend.ts';
import { ENVOY_MISSING, eventually, findEnvoy, send, type EnvoyProcess } from '../helpers/envoy.ts';
import { assertNoKey, bearer, defaultAndReports, FORGED, freePort, KEY, useStack, type Stack } from '../helpers/e2e-stack.ts';

const skip = findEnvoy() === undefined && !process.env.CI ? ENVOY_MISSING : false;

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
async function sidecarOn(ports: { grpc: number; admin: number }, profiles: Record<string, any>, server: Record<string, any> = {}): Promise<SidecarProcess> {
  return startSidecar({
    waitReady: false,
    config: { server: { grpc: `127.0.0.1:${ports.grpc}`, admin: `127.0.0.1:${ports.admin}`, ...server }, profiles },
  });
}

/** Both profiles on the `post` client, `reports` for another resource. */
const withReports = (idp: OAuthServer): Record<string, any> => ({ default: profileFor(idp), reports: profileFor(idp, { resource: 'https://reports.test' }) });

const ready = (r: Record<string, any>): boolean => typeof r.msg === 'string' && r.msg.startsWith('ready');

interface SdsStackOptions {
  ttlSeconds: number;
  profiles: (idp: OAuthServer) => Record<string, any>;
  /** The sidecar's `server` settings besides its ports. */
  server?: Record<string, any>;
  /** The log line to wait for before Envoy starts (by default the sidecar's `ready`). */
  waitFor?: (r: Record<string, any>) => boolean;
  variant?: (config: any) => void;
  sidecarStopSignal?: NodeJS.Signals;
}

/**
 * For the describe() it is called in: an IdP issuing `ttlSeconds` tokens, an echo backend, the
 * sidecar on fixed ports with `profiles`, and Envoy running envoy-sds.yaml against it (the
 * backend health-checked at the sidecar's admin port).
 */
function sdsStack(options: SdsStackOptions): { stack: Stack; ports: { grpc: number; admin: number } } {
  const ports = { grpc: 0, admin: 0 };
  const stack = useStack({
    idp: { ttlSeconds: options.ttlSeconds },
    sidecar: async ({ idp }) => {
      Object.assign(ports, { grpc: await freePort(), admin: await freePort() });
      const sidecar = await sidecarOn(ports, options.profiles(idp), options.server);
      await sidecar.waitForLog(options.waitFor ?? ready);
      return sidecar;
    },
    envoy: {
      config: 'envoy-sds.yaml',
      variant: options.variant,
      clusters: ({ backend }) => ({
        oauth2_extproc: `127.0.0.1:${ports.grpc}`,
        backend: { address: backend.address, healthCheck: `127.0.0.1:${ports.admin}` },
      }),
    },
    sidecarStopSignal: options.sidecarStopSignal,
  });
  return { stack, ports };
}

/** Requests until the backend has seen three different tokens (each refresh pushed over SDS), all valid. */
async function threeTokensReachTheBackend({ envoy, backend, idp }: Stack): Promise<void> {
  const tokens = new Set<string>();
  await eventually('three tokens at the backend', async () => {
    const r = await send(`${envoy.url}/orders/1`);
    assert.equal(r.status, 200, r.body);
    tokens.add(bearer(backend.requests.at(-1)!));
    return tokens.size >= 3 ? true : undefined;
  }, 15_000);
  for (const token of tokens) await idp.verify(token);
}

describe('tokens over SDS, refreshed every second or so', { skip }, () => {
  // 4 s tokens: with the default margin the sidecar uses each for 2 s and refreshes after ~1 s.
  const { stack } = sdsStack({ ttlSeconds: 4, profiles: defaultAndReports });
  const { through } = stack;

  test('the backend receives the profile\'s token in place of the caller\'s, and no key', async () => {
    const received = await through('/orders/42?expand=lines', ['Authorization', FORGED, 'Ocp-Apim-Subscription-Key', KEY]);
    assert.equal(received.url, '/orders/42?expand=lines');
    const c = await stack.idp.verify(bearer(received));
    assert.equal(c.sub, stack.idp.clients.post.clientId);
    assert.equal(c.aud, 'https://upstream.test');
    assertNoKey(received);
  });

  test('a refreshed token reaches the backend without restarting Envoy', async () => {
    const first = bearer(await through('/orders/1'));
    const next = await eventually('a newer token at the backend', async () => {
      const token = bearer(await through('/orders/1'));
      return token !== first ? token : undefined;
    }, 10_000);
    await stack.idp.verify(next);
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
    const before = stack.backend.tally.total;
    const reply = await send(`${stack.envoy.url}/orders/1`, { headers: ['ocp_apim_subscription_key', KEY] });
    assert.equal(reply.status, 400);
    assert.equal(stack.backend.tally.total, before);
  });

  test('the /reports/ route gets the reports profile\'s token, the others the default one', async () => {
    const reports = await stack.idp.verify(bearer(await through('/reports/monthly', ['Authorization', FORGED, 'Ocp-Apim-Subscription-Key', KEY])), 'https://reports.test');
    assert.equal(reports.sub, stack.idp.clients.basic.clientId);
    const other = await stack.idp.verify(bearer(await through('/orders')));
    assert.equal(other.sub, stack.idp.clients.post.clientId);
  });

  test('the bare /healthz route needs no token and drops the caller\'s credentials', async () => {
    const received = await through('/healthz', ['Authorization', FORGED, 'Ocp-Apim-Subscription-Key', KEY]);
    assert.deepEqual(headerValues(received, 'authorization'), []);
    assertNoKey(received);
  });
});

describe('a profile without a usable token fails closed (Envoy answers 401 itself)', { skip }, () => {
  const { stack } = sdsStack({
    ttlSeconds: 4,
    profiles: (idp) => ({
      default: profileFor(idp, { refresh: { minBackoffSeconds: 0.2, maxBackoffSeconds: 0.5 } }),
      // A client the IdP refuses: this profile never holds a token.
      reports: profileFor(idp, { clientSecret: 'not-the-secret', refresh: { minBackoffSeconds: 1, maxBackoffSeconds: 2 } }),
    }),
    waitFor: (r) => r.msg === 'token fetched' && r.profile === 'default',
  });

  test('a profile that never got a token: 401 on its route, the other profile still served', async () => {
    const reply = await send(`${stack.envoy.url}/reports/monthly`, { headers: ['Authorization', FORGED, 'Ocp-Apim-Subscription-Key', KEY] });
    assert.equal(reply.status, 401, reply.body);
    assert.equal((await accessLine(stack.envoy, '/reports/monthly', 401)).details, 'failed_to_inject_credential');
    assert.equal(stack.backend.tally.total, 0);
    const ok = await send(`${stack.envoy.url}/orders/1`);
    assert.equal(ok.status, 200);
    assert.equal(stack.backend.tally.total, 1);
  });

  test('a token that expires with no new one: the secret is emptied and Envoy answers 401', async () => {
    // Every token request fails from now on (for ~20 s of retries); the held token ends 2 s after it was fetched.
    const failure = { status: 503, headers: { 'content-type': 'application/json' }, body: '{"error":"temporarily_unavailable"}' };
    stack.idp.override(...Array.from({ length: 200 }, () => failure));
    const before = stack.backend.tally.total;
    const reply = await eventually('a 401 from Envoy', async () => {
      const r = await send(`${stack.envoy.url}/orders/2`, { headers: ['Ocp-Apim-Subscription-Key', KEY] });
      return r.status === 401 ? r : undefined;
    }, 10_000);
    assert.equal(reply.status, 401);
    assert.equal((await accessLine(stack.envoy, '/orders/2', 401)).details, 'failed_to_inject_credential');
    // Every request that did reach the backend carried a token still valid on arrival.
    for (const received of stack.backend.requests.slice(before)) {
      assert.ok(claims(bearer(received)).exp * 1000 > Date.now() - 5000);
      assertNoKey(received);
    }
    stack.idp.override(undefined);
  });
});

describe('the sidecar dies: restarts go unnoticed, a dead one takes Envoy out of service before its token expires', { skip }, () => {
  // Tokens that outlive the ~15 s Envoy needs to notice: 60 s, used for 30 s.
  const { stack, ports } = sdsStack({ ttlSeconds: 60, profiles: withReports, sidecarStopSignal: 'SIGKILL' });

  test('a sidecar killed and started again: not one request fails meanwhile', async () => {
    assert.equal((await send(`${stack.envoy.url}/orders/1`)).status, 200);
    await stack.sidecar.stop('SIGKILL');
    const statuses: number[] = [];
    const restarted = sidecarOn(ports, withReports(stack.idp));
    let done = false;
    const traffic = (async () => {
      while (!done) statuses.push((await send(`${stack.envoy.url}/orders/1`)).status);
    })();
    stack.sidecar = await restarted;
    await stack.sidecar.waitForLog(ready);
    // Envoy's SDS stream comes back (its retry backoff) and takes the new sidecar's token.
    const fresh = await eventually('the restarted sidecar\'s token at the backend', async () => {
      const before = stack.backend.tally.total;
      const r = await send(`${stack.envoy.url}/orders/1`);
      if (r.status !== 200 || stack.backend.tally.total !== before + 1) return undefined;
      const token = bearer(stack.backend.requests.at(-1)!);
      return stack.idp.tokenRequests.length >= 4 && claims(token).iat * 1000 >= Date.now() - 30_000 ? token : undefined;
    }, 20_000);
    done = true;
    await traffic;
    await stack.idp.verify(fresh);
    assert.ok(statuses.length > 0);
    assert.deepEqual([...new Set(statuses)], [200]);
  });

  test('a sidecar that stays dead: Envoy stops forwarding (503) while its last token is still valid', async () => {
    const before = stack.backend.tally.total;
    assert.equal((await send(`${stack.envoy.url}/orders/1`)).status, 200);
    const lastToken = bearer(stack.backend.requests.at(-1)!);
    const expiresAt = claims(lastToken).exp * 1000;
    await stack.sidecar.stop('SIGKILL');
    const killedAt = Date.now();
    const reply = await eventually('Envoy to stop forwarding', async () => {
      const r = await send(`${stack.envoy.url}/orders/1`, { headers: ['Ocp-Apim-Subscription-Key', KEY] });
      return r.status === 200 ? undefined : r;
    }, 40_000);
    const stoppedAt = Date.now();
    assert.equal(reply.status, 503);
    const line = await accessLine(stack.envoy, '/orders/1', 503);
    assert.deepEqual([line.flags, line.details], ['UH', 'no_healthy_upstream']);
    // The property that matters: Envoy stopped before the token it still holds expired.
    assert.ok(stoppedAt < expiresAt, `stopped ${(stoppedAt - killedAt) / 1000} s after the kill, token expiring ${(expiresAt - killedAt) / 1000} s after it`);
    console.log(`# Envoy stopped forwarding ${(stoppedAt - killedAt) / 1000} s after the sidecar was killed; its last token expired ${(expiresAt - killedAt) / 1000} s after`);
    // Until then, what reached the backend carried the last token, never the caller's key.
    for (const received of stack.backend.requests.slice(before)) {
      assert.equal(bearer(received), lastToken);
      assertNoKey(received);
    }
    // Every route, /healthz included: this Envoy is out of service.
    assert.equal((await send(`${stack.envoy.url}/reports/x`)).status, 503);
    assert.equal((await send(`${stack.envoy.url}/healthz`)).status, 503);
  });
});

describe('with server.workers: 2, the worker holding Envoy\'s SDS stream pushes the primary\'s refreshed tokens', { skip }, () => {
  const { stack } = sdsStack({
    ttlSeconds: 4,
    profiles: withReports,
    server: { workers: 2 },
  });

  test('a token refreshed by the primary reaches the backend', async () => {
    await threeTokensReachTheBackend(stack);
  });
});

describe('with api_type DELTA_GRPC (docs/modes.md), tokens and refreshes arrive over delta xDS', { skip }, () => {
  let left = '';
  const { stack } = sdsStack({
    ttlSeconds: 4,
    profiles: withReports,
    variant: (config) => {
      JSON.stringify(config, (key, value) => {
        if (key === 'api_config_source' && value.api_type === 'GRPC') value.api_type = 'DELTA_GRPC';
        return value;
      });
      left = JSON.stringify(config);
    },
  });

  before(() => {
    // Both profiles' sds_config (one YAML anchor) now say DELTA_GRPC.
    assert.equal((left.match(/"api_type":"DELTA_GRPC"/g) ?? []).length, 2);
    assert.ok(!left.includes('"api_type":"GRPC"'));
  });

  test('three successive tokens reach the backend, each profile on its route', async () => {
    await threeTokensReachTheBackend(stack);
    assert.equal((await send(`${stack.envoy.url}/reports/1`)).status, 200);
    await stack.idp.verify(bearer(stack.backend.requests.at(-1)!), 'https://reports.test');
    const stats = await stack.envoy.stats('^sds\\.');
    assert.equal(stats['sds.default.update_rejected'], 0);
    assert.ok(stats['sds.default.update_success']! >= 3, JSON.stringify(stats));
  });
});
