// Envoy resets every ext_proc stream when it is done with it. Node's HTTP/2 server limits
// received resets per connection (about 1,000, then about 33 a second) and then sends GOAWAY,
// failing every stream in flight. The sidecar must take that churn on one connection, and still
// stop a client that resets streams far faster than Envoy does (CVE-2023-44487, "rapid reset").
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { LIMITS } from '../src/grpc-listener.ts';
import { startBareServer } from '../bench/bare-server.ts';
import { resetFlood } from './helpers/grpc-attacks.ts';
import { ExtProcClient, requestHeaders, setHeaders, TYPICAL_HEADERS } from './helpers/extproc-client.ts';
import { churn } from './helpers/load.ts';
import { startOAuthServer, type OAuthServer } from './helpers/oauth-server.ts';
import { profileFor, startSidecar, type SidecarProcess } from './helpers/sidecar.ts';

const STREAMS = 6000;
const CONCURRENCY = 64;

let idp: OAuthServer;
let sidecar: SidecarProcess;

before(async () => {
  idp = await startOAuthServer();
  sidecar = await startSidecar({ config: { profiles: { default: profileFor(idp) } } });
});

after(async () => {
  await sidecar?.stop();
  await idp?.close();
});

test(`the sidecar answers ${STREAMS} streams reset by the client on one connection, none failing`, async () => {
  const result = await churn(sidecar.grpcAddress, { streams: STREAMS, concurrency: CONCURRENCY });
  assert.deepEqual(result.failures, {});
  assert.equal(result.replies, STREAMS);
  assert.deepEqual(result.replyKinds, { request_headers: STREAMS });
  // Every reset stream was counted once and closed once (the server may see the last resets a
  // moment after the client is done: read until it has, or give up after a while).
  let metrics = '';
  for (let i = 0; i < 50; i++) {
    metrics = await (await fetch(`${sidecar.adminUrl}/metrics`)).text();
    if (/oauth2_extproc_open_streams 0\n/.test(metrics)) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.match(metrics, new RegExp(`oauth2_extproc_requests_total\\{profile="default",outcome="injected"\\} ${STREAMS}\\n`));
  assert.match(metrics, /oauth2_extproc_open_streams 0\n/);
});

test('control: a grpc-js server with Node\'s default reset limits fails under the same churn', async () => {
  // Shows the test above can fail: the bench's bare server answers the same way, on grpc-js's
  // own HTTP/2 server with Node's default reset limits.
  const { address, server } = await startBareServer();
  try {
    const result = await churn(address, { streams: STREAMS, concurrency: CONCURRENCY });
    assert.ok(result.failed > 0, `expected GOAWAY failures without the raised limits, got ${JSON.stringify(result)}`);
  } finally {
    server.forceShutdown();
  }
});

test('a reset flood far above Envoy\'s rate gets GOAWAY; other connections are still served', async () => {
  // Envoy at saturation resets at most ~7,000 streams a second (see LIMITS.resetRate); this
  // client opens and resets streams as fast as one connection takes them.
  const flood = await resetFlood(sidecar.grpcAddress, 10 * LIMITS.resetBurst);
  assert.notEqual(flood.goaway, undefined, `no GOAWAY after ${flood.sent} resets`);
  assert.ok(flood.sent < 10 * LIMITS.resetBurst);
  const client = new ExtProcClient(sidecar.grpcAddress);
  try {
    const { reply } = await client.exchange(requestHeaders(TYPICAL_HEADERS));
    assert.match(setHeaders(reply).authorization ?? '', /^Bearer ey/);
  } finally {
    client.close();
  }
});
