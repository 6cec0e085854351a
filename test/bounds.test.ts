// Everything a caller can grow on the gRPC port is bounded: what abusive clients get, and that
// the sidecar stays within the memory the Kubernetes manifest gives its container.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import type { ClientHttp2Session } from 'node:http2';
import { GrpcListener, LIMITS } from '../src/grpc-listener.ts';
import { parseConfig } from '../src/config.ts';
import { createLogger } from '../src/logger.ts';
import { Metrics } from '../src/metrics.ts';
import { ExtProcClient, requestHeaders, setHeaders, TYPICAL_HEADERS } from './helpers/extproc-client.ts';
import { manifestMemoryLimit, openSession, openStream, podNodeOptions, requestHeadersFrame, streamOutcome, watchRss } from './helpers/grpc-attacks.ts';
import { startOAuthServer, type OAuthServer } from './helpers/oauth-server.ts';
import { profileFor, startSidecar, type SidecarProcess } from './helpers/sidecar.ts';

const MEMORY_LIMIT = manifestMemoryLimit('oauth2-extproc');
const IDLE_SECONDS = 2;
const MiB = 2 ** 20;

let idp: OAuthServer;
let sidecar: SidecarProcess;

before(async () => {
  idp = await startOAuthServer();
  sidecar = await startSidecar({
    config: { server: { streamIdleSeconds: IDLE_SECONDS }, profiles: { default: profileFor(idp) } },
    env: { NODE_OPTIONS: podNodeOptions(MEMORY_LIMIT) },
  });
});

after(async () => {
  await sidecar?.stop();
  await idp?.close();
});

/** A stream as Envoy opens it is still answered with the token. */
async function assertStillServing(): Promise<void> {
  const client = new ExtProcClient(sidecar.grpcAddress);
  try {
    const { reply, status } = await client.exchange(requestHeaders(TYPICAL_HEADERS));
    assert.match(setHeaders(reply).authorization ?? '', /^Bearer ey/);
    assert.equal(status?.code, grpc.status.OK);
  } finally {
    client.close();
  }
}

function tally(outcomes: string[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const o of outcomes) out[o] = (out[o] ?? 0) + 1;
  return out;
}

// First in the file: the count is exact only while no connection of an earlier test is still
// open on the sidecar's side (a client's close reaches it a moment later).
test(`connections past ${LIMITS.maxConnections} are closed at once; those within the limit are served`, async () => {
  const sessions = await Promise.all(Array.from({ length: LIMITS.maxConnections + 10 }, () => openSession(sidecar.grpcAddress)));
  // A refused connection is closed by the sidecar before it sends its SETTINGS.
  const served = await Promise.all(sessions.map((session) => new Promise<boolean>((resolve) => {
    if (session.destroyed) return resolve(false);
    session.once('remoteSettings', () => resolve(true));
    session.once('close', () => resolve(false));
    session.once('error', () => resolve(false));
  })));
  assert.equal(served.filter(Boolean).length, LIMITS.maxConnections);
  for (const session of sessions) session.destroy();
  await assertStillServing();
});

test('a client that sends and never reads: its streams are reset, RSS stays under the pod limit, others are still served', async () => {
  const SESSIONS = 4;
  const STREAMS = 250;
  const MESSAGES = 200;
  const frame = requestHeadersFrame();
  const burst = Buffer.concat(Array.from({ length: MESSAGES }, () => frame));
  const rss = watchRss(sidecar.child.pid!);
  const sessions: ClientHttp2Session[] = [];
  const outcomes: Array<Promise<string>> = [];
  for (let s = 0; s < SESSIONS; s++) {
    const session = await openSession(sidecar.grpcAddress);
    sessions.push(session);
    for (let i = 0; i < STREAMS; i++) {
      const stream = openStream(session);
      stream.pause(); // never read: no WINDOW_UPDATE, the replies cannot leave the sidecar
      outcomes.push(streamOutcome(stream));
      stream.write(burst);
    }
  }
  const ended = tally(await Promise.all(outcomes));
  const peak = rss.stop();
  for (const session of sessions) session.destroy();
  console.log(`# non-reading client: ${SESSIONS * STREAMS * MESSAGES} messages on ${SESSIONS * STREAMS} streams; peak RSS ${(peak / MiB).toFixed(0)} MiB (limit ${MEMORY_LIMIT / MiB} MiB); streams ended ${JSON.stringify(ended)}`);
  // Reset when its replies piled up, or closed when idle (4, DEADLINE_EXCEEDED): never OK.
  assert.equal(Object.values(ended).reduce((a, b) => a + b, 0), SESSIONS * STREAMS);
  assert.deepEqual(Object.keys(ended).filter((k) => k !== 'reset' && k !== String(grpc.status.DEADLINE_EXCEEDED)), []);
  assert.ok((ended.reset ?? 0) > 0, 'streams were reset');
  assert.ok(peak < MEMORY_LIMIT, `peak RSS ${peak} >= ${MEMORY_LIMIT}`);
  await assertStillServing();
});

test('40,000 half-open streams: past the process cap they are refused, the others closed when idle, RSS stays under the pod limit', async () => {
  const SESSIONS = 40;
  const PER_SESSION = LIMITS.maxStreamsPerConnection; // 40 x 1,000 = 40,000
  const frame = requestHeadersFrame();
  const rss = watchRss(sidecar.child.pid!);
  const sessions: ClientHttp2Session[] = [];
  const outcomes: Array<Promise<string>> = [];
  const asked: Array<Promise<string>> = [];
  for (let s = 0; s < SESSIONS; s++) {
    const session = await openSession(sidecar.grpcAddress);
    sessions.push(session);
    for (let i = 0; i < PER_SESSION; i++) {
      const stream = openStream(session);
      const outcome = streamOutcome(stream);
      // Half of them send request_headers and then sit; the others never send anything.
      if (i % 2 === 0) {
        stream.write(frame);
        asked.push(outcome);
      } else {
        outcomes.push(outcome);
      }
    }
    await new Promise((resolve) => setImmediate(resolve));
  }
  const silent = tally(await Promise.all(outcomes));
  const answered = tally(await Promise.all(asked));
  const peak = rss.stop();
  for (const session of sessions) session.destroy();
  console.log(`# 40,000 half-open streams: peak RSS ${(peak / MiB).toFixed(0)} MiB (limit ${MEMORY_LIMIT / MiB} MiB); silent streams ${JSON.stringify(silent)}, streams that sent request_headers ${JSON.stringify(answered)}`);
  // Never a clean OK: every stream ended with an error status (closed when idle: 4,
  // DEADLINE_EXCEEDED) or was reset (refused past the cap, or its status could not be sent).
  const statuses = { ...silent };
  for (const [k, v] of Object.entries(answered)) statuses[k] = (statuses[k] ?? 0) + v;
  assert.deepEqual(Object.keys(statuses).sort(), [String(grpc.status.DEADLINE_EXCEEDED), 'reset']);
  assert.ok(statuses[String(grpc.status.DEADLINE_EXCEEDED)]! <= 40_000 - LIMITS.maxOpenStreams, 'streams past the cap were refused');
  assert.ok(peak < MEMORY_LIMIT, `peak RSS ${peak} >= ${MEMORY_LIMIT}`);
  await assertStillServing();
});

test('forceShutdown closes open streams (grpc-js\'s own finds no session with channelz off)', async () => {
  const config = parseConfig(`profiles: { default: { tokenUrl: 'https://idp.test/t', clientId: a, clientSecret: b } }`, { env: {} });
  const token = { accessToken: 't', tokenType: 'Bearer', obtainedAt: 0, expiresAt: Number.MAX_SAFE_INTEGER, refreshInSeconds: undefined };
  const tokens = { current: () => token, onChange: () => undefined };
  const listener = new GrpcListener({
    profiles: [{ config: config.profiles.default!, tokens }],
    logger: createLogger('silent'),
    metrics: new Metrics({ defaultMetrics: false }),
  });
  const address = await listener.bind('127.0.0.1:0');
  const client = new ExtProcClient(address);
  try {
    // One stream answered and left open, one that never sent anything.
    const answered = client.open();
    const silent = client.open();
    const ended = (call: grpc.ClientDuplexStream<object, Record<string, any>>): Promise<number> =>
      new Promise((resolve) => call.on('error', (err: grpc.ServiceError) => resolve(err.code)).on('status', (s: grpc.StatusObject) => resolve(s.code)));
    const answeredEnd = ended(answered);
    const silentEnd = ended(silent);
    const reply = new Promise((resolve) => answered.once('data', resolve));
    answered.write(requestHeaders(TYPICAL_HEADERS));
    await reply;
    while (listener.openStreams < 2) await new Promise((resolve) => setTimeout(resolve, 10));
    listener.forceShutdown();
    const codes = await Promise.all([answeredEnd, silentEnd]);
    for (const c of codes) assert.notEqual(c, grpc.status.OK);
    assert.equal(listener.connections, 0);
  } finally {
    client.close();
    listener.forceShutdown();
  }
});
