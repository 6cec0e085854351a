// server.workers: several processes serve streams on one port; tokens are fetched once.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { protoPath as healthProtoPath } from 'grpc-health-check';
import { ExtProcClient, requestHeaders, setHeaders, TYPICAL_HEADERS } from './helpers/extproc-client.ts';
import { startOAuthServer } from './helpers/oauth-server.ts';
import { profileFor, startSidecar, type SidecarProcess } from './helpers/sidecar.ts';

test('two workers share the port and the token: one token request for the whole sidecar', async () => {
  const idp = await startOAuthServer();
  const sidecar = await startSidecar({
    config: { server: { workers: 2 }, logging: { level: 'debug' }, profiles: { default: profileFor(idp), other: profileFor(idp, { scope: 'orders.read' }) } },
  });
  try {
    // Separate channels (not shared subchannels) so connections spread over the workers.
    const clients = Array.from({ length: 8 }, (_, i) => new ExtProcClient(sidecar.grpcAddress, { 'grpc.use_local_subchannel_pool': 1, 'test.channel': i }));
    const replies = await Promise.all(clients.flatMap((c, ci) => Array.from({ length: 25 }, (_, i) =>
      c.exchange(requestHeaders(TYPICAL_HEADERS), { profile: (ci * 25 + i) % 2 === 0 ? 'default' : 'other' }))));
    for (const c of clients) c.close();
    assert.equal(replies.length, 200);
    for (const { reply } of replies) assert.match(setHeaders(reply).authorization ?? '', /^Bearer ey/);

    const answeredBy = new Set(sidecar.logs().filter((l) => l.msg === 'request_headers answered').map((l) => l.worker));
    assert.equal(answeredBy.size, 2, `streams were answered by ${answeredBy.size} worker(s)`);
    assert.equal(idp.tokenRequests.length, 2, 'one token request per profile, not per worker');

    const metrics = await (await fetch(`${sidecar.adminUrl}/metrics`)).text();
    const injected = [...metrics.matchAll(/oauth2_extproc_requests_total\{profile="(\w+)",outcome="injected"\} (\d+)/g)]
      .map((m) => [m[1], Number(m[2])]);
    assert.deepEqual(Object.fromEntries(injected), { default: 100, other: 100 });
    assert.match(metrics, /oauth2_extproc_token_fetches_total\{profile="default",result="success",code=""\} 1/);
    assert.equal((await fetch(`${sidecar.adminUrl}/readyz`)).status, 200);
  } finally {
    const code = await sidecar.stop();
    await idp.close();
    assert.equal(code, 0);
  }
});

function healthCheck(address: string): Promise<string> {
  const def = loadSync(healthProtoPath, { keepCase: true, enums: String });
  const Health = (grpc.loadPackageDefinition(def) as any).grpc.health.v1.Health as grpc.ServiceClientConstructor;
  const client = new Health(address, grpc.credentials.createInsecure()) as any;
  return new Promise((resolve, reject) => {
    client.Check({ service: '' }, (err: Error | null, res: { status: string }) => {
      client.close();
      if (err) reject(err);
      else resolve(res.status);
    });
  });
}

async function readyz(sidecar: SidecarProcess): Promise<{ status: number; body: Record<string, any> }> {
  const res = await fetch(`${sidecar.adminUrl}/readyz`);
  return { status: res.status, body: await res.json() as Record<string, any> };
}

test('expires_in 1e13 with two workers: every worker injects the token, and gRPC health and /readyz agree', async () => {
  const idp = await startOAuthServer();
  idp.override({ status: 200, headers: { 'content-type': 'application/json' }, body: '{"access_token":"huge-lifetime-token","expires_in":1e13}' });
  const sidecar = await startSidecar({ config: { server: { workers: 2 }, logging: { level: 'debug' }, profiles: { default: profileFor(idp) } } });
  try {
    const clients = Array.from({ length: 6 }, (_, i) => new ExtProcClient(sidecar.grpcAddress, { 'grpc.use_local_subchannel_pool': 1, 'test.channel': i }));
    const replies = await Promise.all(clients.flatMap((c) => Array.from({ length: 10 }, () => c.exchange(requestHeaders(TYPICAL_HEADERS)))));
    for (const c of clients) c.close();
    for (const { reply } of replies) assert.equal(setHeaders(reply).authorization, 'Bearer huge-lifetime-token');
    assert.equal(new Set(sidecar.logs().filter((l) => l.msg === 'request_headers answered').map((l) => l.worker)).size, 2);
    assert.equal(await healthCheck(sidecar.grpcAddress), 'SERVING');
    assert.deepEqual(await readyz(sidecar), { status: 200, body: { ready: true, draining: false, profiles: { default: 'token' }, workers: { configured: 2, serving: 2, restarts: 0 } } });
    assert.ok(!sidecar.logs().some((l) => l.level === 'error' || l.level === 'fatal'));
  } finally {
    const code = await sidecar.stop();
    await idp.close();
    assert.equal(code, 0);
  }
});

test('a worker killed with SIGKILL is replaced after a backoff that grows while it keeps crashing; the log, the metrics and /readyz show it', async () => {
  const idp = await startOAuthServer();
  const sidecar = await startSidecar({ config: { server: { workers: 2 }, profiles: { default: profileFor(idp) } } });
  const listening = (): number[] => sidecar.logs().filter((l) => l.msg === 'worker listening').map((l) => l.pid as number);
  try {
    await sidecar.waitForLog(() => listening().length === 2);
    const [survivor, victim] = listening() as [number, number];

    // Kill one slot's worker, then each replacement as soon as it listens: three crashes in a row.
    let target = victim;
    const exits: Array<Record<string, any>> = [];
    for (let i = 0; i < 3; i++) {
      const known = listening().length;
      process.kill(target, 'SIGKILL');
      exits.push(await sidecar.waitForLog((l) => l.msg !== 'worker listening' && l.pid === target && l.signal === 'SIGKILL'));
      // The other worker still serves meanwhile, and the pod stays ready with one of two.
      const client = new ExtProcClient(sidecar.grpcAddress);
      assert.match(setHeaders((await client.exchange(requestHeaders(TYPICAL_HEADERS))).reply).authorization ?? '', /^Bearer ey/);
      client.close();
      await sidecar.waitForLog(() => listening().length === known + 1);
      target = listening().at(-1)!;
    }
    assert.deepEqual(exits.map((e) => [e.level, e.crashesInARow, e.restartInSeconds, e.serving, e.configured]), [
      ['error', 1, 0.1, 1, 2],
      ['error', 2, 0.2, 1, 2],
      ['error', 3, 0.4, 1, 2],
    ]);
    assert.deepEqual(exits.map((e) => e.msg), [
      'a worker exited; starting another',
      'a worker exited; starting another',
      'a worker keeps crashing; starting another after a backoff',
    ]);
    assert.ok(!listening().slice(2).includes(survivor));

    const metrics = await (await fetch(`${sidecar.adminUrl}/metrics`)).text();
    assert.match(metrics, /^oauth2_extproc_worker_restarts_total 3$/m);
    assert.match(metrics, /^oauth2_extproc_workers_serving 2$/m);
    assert.deepEqual((await readyz(sidecar)).body.workers, { configured: 2, serving: 2, restarts: 3 });

    // Both at once: not ready (nothing serves the port), logged, then ready again.
    for (const pid of [survivor, target]) process.kill(pid, 'SIGKILL');
    const down = await sidecar.waitForLog((l) => l.msg === 'not ready: no worker is serving');
    assert.equal(down.level, 'warn');
    assert.equal(down.workers.serving, 0);
    await sidecar.waitForLog((l) => l.msg === 'ready: every profile holds a token' && l.time > down.time);
    await sidecar.waitForLog(() => listening().length === 7);
    assert.equal((await readyz(sidecar)).status, 200);
  } finally {
    const code = await sidecar.stop();
    await idp.close();
    assert.equal(code, 0);
  }
});

test('with two workers, a token that expires while refreshes fail turns /readyz, gRPC health and every answer to "no" together', async () => {
  const idp = await startOAuthServer({ ttlSeconds: 3 });
  const sidecar = await startSidecar({
    config: { server: { workers: 2 }, profiles: { default: profileFor(idp, { refresh: { marginSeconds: 0, minBackoffSeconds: 0.2, maxBackoffSeconds: 0.2 } }) } },
  });
  try {
    idp.override(...Array.from({ length: 50 }, () => ({ status: 401, headers: { 'content-type': 'application/json' }, body: '{"error":"invalid_client"}' })));
    assert.equal(await healthCheck(sidecar.grpcAddress), 'SERVING');
    const lost = await sidecar.waitForLog((l) => l.msg === 'not ready: a profile has no usable token');
    assert.deepEqual(lost.profiles, { default: 'no_token' });
    assert.deepEqual(await readyz(sidecar), { status: 503, body: { ready: false, draining: false, profiles: { default: 'no_token' }, workers: { configured: 2, serving: 2, restarts: 0 } } });
    const clients = Array.from({ length: 4 }, (_, i) => new ExtProcClient(sidecar.grpcAddress, { 'grpc.use_local_subchannel_pool': 1, 'test.channel': i }));
    for (const c of clients) {
      assert.equal((await c.exchange(requestHeaders(TYPICAL_HEADERS))).reply.immediate_response?.status.code, 'ServiceUnavailable');
      c.close();
    }
    assert.equal(await healthCheck(sidecar.grpcAddress), 'NOT_SERVING');
  } finally {
    const code = await sidecar.stop();
    await idp.close();
    assert.equal(code, 0);
  }
});
