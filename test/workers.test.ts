// server.workers: several processes serve streams on one port; tokens are fetched once.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ExtProcClient, requestHeaders, setHeaders, TYPICAL_HEADERS } from './helpers/extproc-client.ts';
import { startOAuthServer } from './helpers/oauth-server.ts';
import { profileFor, startSidecar } from './helpers/sidecar.ts';

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
    assert.equal(await sidecar.stop(), 0);
    await idp.close();
  }
});
