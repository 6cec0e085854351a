// The real sidecar process, started through its CLI, against a real OAuth2 server, spoken to by
// the Envoy stand-in (grpc-js client from the upstream protos).
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { protoPath as healthProtoPath } from 'grpc-health-check';
import { ExtProcClient, requestHeaders, setHeaders, TYPICAL_HEADERS } from './helpers/extproc-client.ts';
import { startOAuthServer, type OAuthServer } from './helpers/oauth-server.ts';
import { profileFor, startSidecar, type SidecarProcess } from './helpers/sidecar.ts';

let idp: OAuthServer;
before(async () => {
  idp = await startOAuthServer();
});
after(async () => {
  await idp.close();
});

function healthCheck(address: string, service: string): Promise<string> {
  const def = loadSync(healthProtoPath, { keepCase: true, enums: String });
  const Health = (grpc.loadPackageDefinition(def) as any).grpc.health.v1.Health as grpc.ServiceClientConstructor;
  const client = new Health(address, grpc.credentials.createInsecure()) as any;
  return new Promise((resolve, reject) => {
    client.Check({ service }, (err: Error | null, res: { status: string }) => {
      client.close();
      if (err) reject(err);
      else resolve(res.status);
    });
  });
}

describe('the DESIGN.md example config, pointed at a local token endpoint', () => {
  let sidecar: SidecarProcess;
  const dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-design-'));

  before(async () => {
    writeFileSync(join(dir, 'client-secret'), `${idp.clients.post.clientSecret}\n`);
    const { port } = new URL(idp.tokenUrl);
    sidecar = await startSidecar({
      dir,
      config: `
server:
  grpc: 127.0.0.1:0
  admin: 127.0.0.1:0
logging:
  level: info
profiles:
  default:
    tokenUrl: http://127.0.0.1:${port}/\${TENANT_ID}
    clientId: \${CLIENT_ID}
    clientSecret: \${file:${join(dir, 'client-secret')}}
    scope: api://orders/.default
`,
      env: { TENANT_ID: 'token', CLIENT_ID: idp.clients.post.clientId },
    });
  });
  after(async () => {
    assert.equal(await sidecar.stop(), 0);
  });

  test('answers an Envoy-shaped stream with a verifiable token and the key removed', async () => {
    const client = new ExtProcClient(sidecar.grpcAddress);
    const { reply } = await client.exchange(requestHeaders(TYPICAL_HEADERS));
    client.close();
    assert.deepEqual(reply.request_headers.response.header_mutation.remove_headers, ['ocp-apim-subscription-key']);
    const authorization = setHeaders(reply).authorization!;
    assert.match(authorization, /^Bearer ey/);
    const claims = await idp.verify(authorization.slice('Bearer '.length));
    assert.equal(claims.client_id, idp.clients.post.clientId);
    assert.equal(claims.scope, 'api://orders/.default');
  });

  test('is ready, healthy, SERVING on gRPC health, and exposes metrics', async () => {
    assert.equal((await fetch(`${sidecar.adminUrl}/healthz`)).status, 200);
    const ready = await fetch(`${sidecar.adminUrl}/readyz`);
    assert.equal(ready.status, 200);
    assert.deepEqual(await ready.json(), { ready: true, draining: false, profiles: { default: 'token' } });
    assert.equal(await healthCheck(sidecar.grpcAddress, ''), 'SERVING');
    assert.equal(await healthCheck(sidecar.grpcAddress, 'envoy.service.ext_proc.v3.ExternalProcessor'), 'SERVING');
    const metrics = await (await fetch(`${sidecar.adminUrl}/metrics`)).text();
    assert.match(metrics, /oauth2_extproc_token_fetches_total\{profile="default",result="success",code=""\} 1/);
    assert.match(metrics, /oauth2_extproc_requests_total\{profile="default",outcome="injected"\} 1/);
    assert.match(metrics, /oauth2_extproc_token_expiry_seconds\{profile="default"\} (29\d|300)/);
    assert.match(metrics, /oauth2_extproc_token_fetch_duration_seconds_count\{profile="default"\} 1/);
    assert.match(metrics, /oauth2_extproc_open_streams 0/);
  });

  test('a healthy start logs no warning', () => {
    assert.deepEqual(sidecar.logs().filter((l) => l.level !== 'info' && l.level !== 'debug' && l.level !== 'trace'), []);
  });

  test('logs one line per token fetch, with profile, outcome, duration and expiry', async () => {
    const fetched = sidecar.logs().filter((l) => l.msg === 'token fetched');
    assert.equal(fetched.length, 1);
    assert.equal(fetched[0]!.profile, 'default');
    assert.equal(fetched[0]!.outcome, 'success');
    assert.equal(typeof fetched[0]!.durationMs, 'number');
    assert.equal(fetched[0]!.expiresInSeconds, 300);
  });
});

describe('cold start under load', () => {
  test('hundreds of streams before the first token are answered at once and cause exactly one token request', async () => {
    const server = await startOAuthServer();
    server.override({ delayMs: 1500 });
    const sidecar = await startSidecar({ config: { profiles: { default: profileFor(server) } }, waitReady: false });
    try {
      const client = new ExtProcClient(sidecar.grpcAddress);
      const cold = await Promise.all(Array.from({ length: 300 }, () => client.exchange(requestHeaders(TYPICAL_HEADERS))));
      // Answered while the one token request was still waiting on the IdP: none of them waited for it.
      assert.equal(server.tokenRequests.length, 1);
      assert.ok(cold.every(({ reply }) => reply.immediate_response?.status.code === 'ServiceUnavailable'));
      assert.equal((await fetch(`${sidecar.adminUrl}/readyz`)).status, 503);

      await sidecar.waitForLog((r) => typeof r.msg === 'string' && r.msg.startsWith('ready'));
      const warm = await Promise.all(Array.from({ length: 300 }, () => client.exchange(requestHeaders(TYPICAL_HEADERS))));
      client.close();
      assert.ok(warm.every(({ reply }) => setHeaders(reply).authorization?.startsWith('Bearer ey')));
      assert.equal(server.tokenRequests.length, 1);
    } finally {
      await sidecar.stop();
      await server.close();
    }
  });
});

describe('the token endpoint is down', () => {
  test('streams get the 503 JSON answer, the process keeps serving and says why', async () => {
    const server = await startOAuthServer();
    server.override(...Array.from({ length: 20 }, () => ({ status: 400, headers: { 'content-type': 'application/json' }, body: '{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}' })));
    const sidecar = await startSidecar({ config: { profiles: { default: profileFor(server) } }, waitReady: false });
    try {
      const failed = await sidecar.waitForLog((r) => r.msg === 'token fetch failed');
      assert.equal(failed.level, 'warn');
      assert.equal(failed.code, 'OAUTH2_ERR_TOKEN_STATUS');
      assert.equal(failed.status, 400);
      assert.equal(failed.oauthError, 'invalid_client');
      assert.equal(failed.oauthErrorDescription, 'AADSTS7000215: Invalid client secret provided.');
      const client = new ExtProcClient(sidecar.grpcAddress);
      const { reply } = await client.exchange(requestHeaders(TYPICAL_HEADERS));
      client.close();
      assert.equal(reply.immediate_response.status.code, 'ServiceUnavailable');
      assert.deepEqual(JSON.parse(reply.immediate_response.body.toString()), {
        error: 'OAUTH2_ERR_NO_TOKEN', message: 'no usable access token for this profile', profile: 'default',
      });
      const readyz = await fetch(`${sidecar.adminUrl}/readyz`);
      assert.equal(readyz.status, 503);
      assert.deepEqual(await readyz.json(), { ready: false, draining: false, profiles: { default: 'no_token' } });
      assert.equal(await healthCheck(sidecar.grpcAddress, ''), 'NOT_SERVING');
      assert.equal(sidecar.child.exitCode, null);
    } finally {
      await sidecar.stop();
      await server.close();
    }
  });
});

describe('SIGTERM', () => {
  test('readiness goes 503, an in-flight stream still gets its answer, then the process exits 0', async () => {
    const sidecar = await startSidecar({ config: { server: { shutdownGraceSeconds: 10 }, profiles: { default: profileFor(idp) } } });
    const client = new ExtProcClient(sidecar.grpcAddress);
    const call = client.open();
    const reply = new Promise<Record<string, any>>((resolve) => call.on('data', resolve));
    const status = new Promise<grpc.StatusObject>((resolve) => call.on('status', resolve));
    // Let the stream reach the server before the signal.
    await new Promise((r) => setTimeout(r, 200));
    sidecar.child.kill('SIGTERM');
    const draining = await sidecar.waitForLog((r) => r.msg === 'draining');
    assert.equal(draining.openStreams, 1);
    assert.equal((await fetch(`${sidecar.adminUrl}/readyz`)).status, 503);
    call.write(requestHeaders(TYPICAL_HEADERS));
    assert.match(setHeaders(await reply).authorization!, /^Bearer ey/);
    call.end();
    assert.equal((await status).code, grpc.status.OK);
    client.close();
    assert.equal(await sidecar.exited, 0);
    assert.ok(sidecar.logs().some((r) => r.msg === 'stopped'));
  });
});

describe('logs at debug level', () => {
  test('never contain the client secret, a token, the subscription key or the caller\'s authorization', async () => {
    const server = await startOAuthServer({ ttlSeconds: 2 });
    // A failure first, so the error path is logged too; then real tokens, refreshed every second.
    server.override({ status: 401, headers: { 'content-type': 'application/json' }, body: '{"error":"invalid_client"}' });
    const sidecar = await startSidecar({
      config: {
        logging: { level: 'trace' },
        profiles: { default: profileFor(server, { timeoutSeconds: 5, refresh: { minBackoffSeconds: 0.1, marginSeconds: 0 } }) },
      },
      waitReady: true,
    });
    const seen = new Set<string>();
    try {
      const client = new ExtProcClient(sidecar.grpcAddress);
      for (let i = 0; i < 20; i++) {
        const { reply } = await client.exchange(requestHeaders(TYPICAL_HEADERS));
        const value = setHeaders(reply).authorization;
        if (value !== undefined) seen.add(value.slice('Bearer '.length));
        await new Promise((r) => setTimeout(r, 100));
      }
      client.close();
    } finally {
      await sidecar.stop();
      await server.close();
    }
    assert.ok(seen.size >= 1);
    const output = sidecar.stdout.join('\n') + sidecar.stderr.join('');
    assert.ok(output.includes('"level":"debug"'), 'the run logged at debug level');
    for (const secret of [server.clients.post.clientSecret, '0123456789abcdef0123456789abcdef', 'forged-by-the-caller', ...seen]) {
      assert.ok(!output.includes(secret), `the output contains a secret (${secret.slice(0, 6)}…)`);
      // Also not in part: the JWT's signature alone would be a leak.
      if (secret.split('.').length === 3) assert.ok(!output.includes(secret.split('.')[2]!));
    }
  });
});

/** One metric sample's value from a Prometheus exposition, or undefined when the series is absent. */
function sample(metrics: string, series: string): number | undefined {
  const line = metrics.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

describe('a fresh start', () => {
  test('every request and fetch counter exists at zero before first use', async () => {
    const server = await startOAuthServer();
    server.override({ delayMs: 1000 }, { delayMs: 1000 });
    // The secret from the environment, as the README says: a literal one would rightly warn.
    const env = { CLIENT_SECRET: server.clients.post.clientSecret };
    const secret = { clientSecret: '${CLIENT_SECRET}' };
    const sidecar = await startSidecar({ config: { profiles: { default: profileFor(server, secret), open: profileFor(server, { ...secret, onFailure: 'allow' }) } }, env, waitReady: false });
    try {
      const metrics = await (await fetch(`${sidecar.adminUrl}/metrics`)).text();
      for (const profile of ['default', 'open']) {
        for (const outcome of ['injected', 'denied', 'allowed_without_token']) {
          assert.equal(sample(metrics, `oauth2_extproc_requests_total{profile="${profile}",outcome="${outcome}"}`), 0, `${profile} ${outcome}\n${metrics}`);
        }
        assert.equal(sample(metrics, `oauth2_extproc_token_fetches_total{profile="${profile}",result="success",code=""}`), 0);
        for (const code of ['OAUTH2_ERR_TOKEN_NETWORK', 'OAUTH2_ERR_TOKEN_TIMEOUT', 'OAUTH2_ERR_TOKEN_STATUS', 'OAUTH2_ERR_TOKEN_RESPONSE', 'OAUTH2_ERR_SECRET']) {
          assert.equal(sample(metrics, `oauth2_extproc_token_fetches_total{profile="${profile}",result="error",code="${code}"}`), 0, code);
        }
        assert.equal(sample(metrics, `oauth2_extproc_token_fetch_duration_seconds_count{profile="${profile}"}`), 0);
      }
      // Not ready while the first fetches are in flight, and that is no reason to warn.
      assert.equal((await fetch(`${sidecar.adminUrl}/readyz`)).status, 503);
      await sidecar.waitForLog((r) => typeof r.msg === 'string' && r.msg.startsWith('ready'));
      const after = await (await fetch(`${sidecar.adminUrl}/metrics`)).text();
      assert.equal(sample(after, 'oauth2_extproc_token_fetches_total{profile="default",result="success",code=""}'), 1);
      assert.deepEqual(sidecar.logs().filter((l) => l.level === 'warn' || l.level === 'error'), []);
    } finally {
      await sidecar.stop();
      await server.close();
    }
  });
});

describe('onFailure: allow without a token', () => {
  test('is ready once its first fetch has ended (not before), says no_token, warns, and requests continue without a token', async () => {
    const server = await startOAuthServer();
    server.override('hang', ...Array.from({ length: 20 }, () => ({ status: 401, headers: { 'content-type': 'application/json' }, body: '{"error":"invalid_client"}' })));
    const sidecar = await startSidecar({
      config: { profiles: { default: profileFor(server, { onFailure: 'allow', timeoutSeconds: 3, refresh: { minBackoffSeconds: 5 } }) } },
      waitReady: false,
    });
    try {
      // The first fetch still hangs: a fail-open profile waits for it like any other.
      const early = await fetch(`${sidecar.adminUrl}/readyz`);
      assert.equal(early.status, 503);
      assert.deepEqual(await early.json(), { ready: false, draining: false, profiles: { default: 'no_token' } });
      assert.equal(await healthCheck(sidecar.grpcAddress, ''), 'NOT_SERVING');

      const ready = await sidecar.waitForLog((r) => typeof r.msg === 'string' && r.msg.startsWith('ready'));
      assert.equal(ready.level, 'warn');
      assert.equal(ready.msg, 'ready: serving, but an onFailure: allow profile has no token (its requests continue without one)');
      assert.deepEqual(ready.withoutToken, ['default']);
      const readyz = await fetch(`${sidecar.adminUrl}/readyz`);
      assert.equal(readyz.status, 200);
      assert.deepEqual(await readyz.json(), { ready: true, draining: false, profiles: { default: 'no_token' } });
      assert.equal(await healthCheck(sidecar.grpcAddress, ''), 'SERVING');
      assert.ok(sidecar.logs().some((r) => r.msg === 'token fetch failed' && r.code === 'OAUTH2_ERR_TOKEN_TIMEOUT'));

      const client = new ExtProcClient(sidecar.grpcAddress);
      const { reply } = await client.exchange(requestHeaders(TYPICAL_HEADERS));
      client.close();
      assert.equal(reply.immediate_response, undefined);
      assert.equal(setHeaders(reply).authorization, undefined);
      assert.ok(reply.request_headers.response.header_mutation.remove_headers.includes('ocp-apim-subscription-key'));
    } finally {
      await sidecar.stop();
      await server.close();
    }
  });
});

describe('token sanity through the real process', () => {
  test('expires_in 1e13 is served (health, /readyz and requests agree); a 70 KB token is refused (they agree again)', async () => {
    const huge = await startOAuthServer();
    const big = await startOAuthServer();
    huge.override({ status: 200, headers: { 'content-type': 'application/json' }, body: '{"access_token":"huge-lifetime-token","token_type":"Bearer","expires_in":1e13,"refresh_in":1e300}' });
    big.override(...Array.from({ length: 30 }, () => ({ status: 200, headers: { 'content-type': 'application/json' }, body: JSON.stringify({ access_token: 'b'.repeat(70_000), expires_in: 3600 }) })));
    const sidecar = await startSidecar({
      config: { profiles: { default: profileFor(huge), big: profileFor(big, { refresh: { minBackoffSeconds: 0.2, maxBackoffSeconds: 0.2 } }) } },
      waitReady: false,
    });
    try {
      const fetched = await sidecar.waitForLog((r) => r.msg === 'token fetched' && r.profile === 'default');
      assert.equal(fetched.expiresInSeconds, 365 * 24 * 3600);
      const refused = await sidecar.waitForLog((r) => r.msg === 'token fetch failed' && r.profile === 'big');
      assert.equal(refused.code, 'OAUTH2_ERR_TOKEN_RESPONSE');
      assert.equal(refused.reason, 'the token is 70007 bytes as a header value, more than maxTokenBytes (16384): Envoy would refuse requests carrying it');

      const readyz = await fetch(`${sidecar.adminUrl}/readyz`);
      assert.equal(readyz.status, 503);
      assert.deepEqual(await readyz.json(), { ready: false, draining: false, profiles: { default: 'token', big: 'no_token' } });
      assert.equal(await healthCheck(sidecar.grpcAddress, ''), 'NOT_SERVING');
      const client = new ExtProcClient(sidecar.grpcAddress);
      assert.equal(setHeaders((await client.exchange(requestHeaders(TYPICAL_HEADERS))).reply).authorization, 'Bearer huge-lifetime-token');
      assert.equal((await client.exchange(requestHeaders(TYPICAL_HEADERS), { profile: 'big' })).reply.immediate_response.status.code, 'ServiceUnavailable');
      client.close();
      assert.ok(!sidecar.stderr.join('').includes('RangeError'));
      assert.ok(!sidecar.logs().some((r) => r.msg?.startsWith('unhandled')));
    } finally {
      await sidecar.stop();
      await huge.close();
      await big.close();
    }
  });
});
