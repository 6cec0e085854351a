// gRPC on the wire, black-box: what the listener's ext_proc path answers to HTTP/2 frames a
// raw node:http2 client writes (split and coalesced messages, bad prefixes, bad protobuf, wrong
// content-type, resets), and that health and unknown methods are still answered on the same
// port. Written against grpc-js's answers, so that any other implementation of the Process path
// must answer the same way.
import assert from 'node:assert/strict';
import http2, { type ClientHttp2Session, type ClientHttp2Stream, type IncomingHttpHeaders } from 'node:http2';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseConfig } from '../src/config.ts';
import { LIMITS, type GrpcListener } from '../src/grpc-listener.ts';
import { createLogger } from '../src/logger.ts';
import { Metrics } from '../src/metrics.ts';
import { PROCESS_PATH } from '../src/protocols/ext-proc-wire.ts';
import type { Token } from '../src/token.ts';
import { ExtProcClient, requestHeaders, setHeaders, TYPICAL_HEADERS, upstreamMethod } from './helpers/extproc-client.ts';
import { serveExtProc } from './helpers/ext-proc-server.ts';
import { grpcFrame, openSession } from './helpers/grpc-attacks.ts';

const config = parseConfig(`
profiles:
  default: { tokenUrl: 'https://idp.test/token', clientId: a, clientSecret: b }
  other: { tokenUrl: 'https://idp.test/token', clientId: a, clientSecret: b }
`, { env: {} });
const token = (accessToken: string): Token => ({ accessToken, tokenType: 'Bearer', obtainedAt: 0, expiresAt: 1, refreshInSeconds: undefined });
const tokens: Record<string, Token> = { default: token('eyJ.default'), other: token('eyJ.other') };
const upstream = upstreamMethod();

let listener: GrpcListener;
let address: string;
let session: ClientHttp2Session;

before(async () => {
  ({ listener, address } = await serveExtProc({
    profiles: Object.values(config.profiles).map((p) => ({ config: p, tokens: { current: () => tokens[p.name] } })),
    logger: createLogger('silent'),
    metrics: new Metrics({ defaultMetrics: false }),
  }));
  session = await openSession(address);
});

after(() => {
  session.destroy();
  listener.forceShutdown();
});

const encode = (message: object): Buffer => grpcFrame(upstream.requestSerialize(message));
const requestHeadersFrame = (): Buffer => encode(requestHeaders(TYPICAL_HEADERS, false));
const responseHeadersFrame = (): Buffer => encode({ response_headers: { headers: { headers: [{ key: ':status', raw_value: Buffer.from('200') }] }, end_of_stream: true } });

interface Outcome {
  headers: IncomingHttpHeaders;
  trailers: IncomingHttpHeaders;
  /** Each framed message of the response body, as sent (not decoded). */
  messages: Buffer[];
  grpcStatus: number | undefined;
  grpcMessage: string | undefined;
  rstCode: number | undefined;
  /** The server had not ended the stream 5 s after it opened (we reset it). */
  stuck: boolean;
}

interface Exchange {
  path?: string;
  contentType?: string;
  profile?: string;
  /** Writes the request body; the stream is open when it is called. */
  send(stream: ClientHttp2Stream): Promise<void> | void;
  /** Ends our side once this many replies came (and in any case once the server ended its side). */
  endAfter?: number;
}

/** One stream on the shared connection: what the server answered, whole. */
async function exchange(ex: Exchange, on: ClientHttp2Session = session): Promise<Outcome> {
  const request: http2.OutgoingHttpHeaders = { ':method': 'POST', ':path': ex.path ?? PROCESS_PATH, 'content-type': ex.contentType ?? 'application/grpc', te: 'trailers' };
  if (ex.profile !== undefined) request['x-oauth2-profile'] = ex.profile;
  const stream = on.request(request, { endStream: false });
  const out: Outcome = { headers: {}, trailers: {}, messages: [], grpcStatus: undefined, grpcMessage: undefined, rstCode: undefined, stuck: false };
  let pending = Buffer.alloc(0);
  const endOurs = (): void => void (stream.writable && !stream.writableEnded && stream.end());
  const closed = new Promise<void>((resolve) => {
    stream.on('error', () => {});
    stream.on('response', (headers) => void (out.headers = headers));
    stream.on('trailers', (trailers) => void (out.trailers = trailers));
    stream.on('data', (chunk: Buffer) => {
      pending = Buffer.concat([pending, chunk]);
      while (pending.length >= 5 && pending.length >= 5 + pending.readUInt32BE(1)) {
        const size = 5 + pending.readUInt32BE(1);
        out.messages.push(pending.subarray(0, size));
        pending = pending.subarray(size);
      }
      if (ex.endAfter !== undefined && out.messages.length >= ex.endAfter) endOurs();
    });
    // The server ended its side (with a status, or trailers-only): nothing more to say on ours.
    stream.on('end', () => void (stream.closed || stream.close(http2.constants.NGHTTP2_NO_ERROR)));
    // A server that never ends the stream fails the test instead of hanging it.
    const stuck = setTimeout(() => {
      out.stuck = true;
      stream.close(http2.constants.NGHTTP2_CANCEL);
    }, 5000);
    stream.on('close', () => {
      clearTimeout(stuck);
      out.rstCode = stream.rstCode;
      resolve();
    });
  });
  await ex.send(stream);
  await closed;
  const status = out.trailers['grpc-status'] ?? out.headers['grpc-status'];
  out.grpcStatus = status === undefined ? undefined : Number(status);
  const message = out.trailers['grpc-message'] ?? out.headers['grpc-message'];
  out.grpcMessage = message === undefined ? undefined : String(message);
  return out;
}

const decode = (message: Buffer): Record<string, any> => {
  assert.equal(message[0], 0, 'a reply arrived compressed');
  return upstream.responseDeserialize(message.subarray(5));
};
const authorization = (message: Buffer): string | undefined => setHeaders(decode(message)).authorization;
const noTokenIn = (out: Outcome): void => {
  for (const m of out.messages) assert.doesNotMatch(m.toString('latin1'), /eyJ\./, 'a reply carries the token');
};

/** A well-formed stream still gets its token: the shape every failure case ends with. */
async function stillServes(on: ClientHttp2Session = session): Promise<void> {
  const out = await exchange({ send: (s) => void s.write(requestHeadersFrame()), endAfter: 1 }, on);
  assert.equal(out.messages.length, 1);
  assert.equal(authorization(out.messages[0]!), 'Bearer eyJ.default');
  assert.equal(out.grpcStatus, 0);
}

test('1. a request_headers message split over three DATA frames gets one reply with the token, then status 0', async () => {
  const bytes = requestHeadersFrame();
  const cuts = [3, 5 + 20, bytes.length];
  const out = await exchange({
    endAfter: 1,
    async send(stream) {
      let from = 0;
      for (const to of cuts) {
        stream.write(bytes.subarray(from, to));
        from = to;
        await sleep(20);
      }
    },
  });
  assert.equal(out.headers[':status'], 200);
  assert.match(String(out.headers['content-type']), /^application\/grpc/);
  assert.equal(out.messages.length, 1);
  assert.equal(decode(out.messages[0]!).response, 'request_headers');
  assert.equal(authorization(out.messages[0]!), 'Bearer eyJ.default');
  assert.equal(out.grpcStatus, 0);
});

test('2. two messages in one DATA frame get two replies, in order', async () => {
  const out = await exchange({ endAfter: 2, send: (s) => void s.write(Buffer.concat([requestHeadersFrame(), responseHeadersFrame()])) });
  assert.deepEqual(out.messages.map((m) => decode(m).response), ['request_headers', 'response_headers']);
  assert.equal(authorization(out.messages[0]!), 'Bearer eyJ.default');
  assert.equal(out.grpcStatus, 0);
});

test('3. a compressed flag with no grpc-encoding negotiated fails the stream: the bytes are not read as a message', async () => {
  // grpc-js (before the hand-written Process path) ignored the flag under identity encoding, read
  // the bytes as the message and answered with the token and OK. The gRPC spec makes a compressed
  // message without an agreed encoding a protocol error.
  const body = upstream.requestSerialize(requestHeaders(TYPICAL_HEADERS, false));
  const out = await exchange({ endAfter: 1, send: (s) => void s.write(grpcFrame(body, true)) });
  assert.equal(out.stuck, false);
  assert.equal(out.messages.length, 0);
  assert.notEqual(out.grpcStatus, 0);
  assert.equal(out.grpcStatus, 13); // INTERNAL
  await stillServes();
});

test('4 + 10. a 1 MiB length prefix gets RESOURCE_EXHAUSTED, an ASCII grpc-message, and the port still serves', async () => {
  const size = 1024 * 1024;
  assert.ok(size > LIMITS.maxMessageBytes);
  const prefix = Buffer.alloc(5);
  prefix.writeUInt32BE(size, 1);
  const out = await exchange({
    send(stream) {
      // The whole message follows: an implementation may check the prefix or the full message.
      stream.write(prefix);
      for (let i = 0; i < 16 && !stream.destroyed; i++) stream.write(Buffer.alloc(size / 16));
    },
  });
  // grpc-js path: trailers-only 8, 'Received%20message%20larger%20than%20max%20(1048576%20vs%20262144)'.
  assert.equal(out.grpcStatus, 8);
  assert.equal(out.messages.length, 0);
  assert.ok(out.grpcMessage !== undefined && out.grpcMessage.length > 0, 'no grpc-message');
  assert.match(out.grpcMessage, /^[\x20-\x7e]*$/);
  await stillServes();
});

test('5. content-type text/plain on the Process path: 415 or a gRPC error, no reply', async () => {
  const out = await exchange({ contentType: 'text/plain', send: (s) => void s.write(requestHeadersFrame()) });
  // grpc-js path today: HTTP 415, no grpc-status.
  assert.ok(Number(out.headers[':status']) === 415 || (out.grpcStatus !== undefined && out.grpcStatus !== 0), `answered :status ${out.headers[':status']}, grpc-status ${out.grpcStatus}`);
  assert.equal(out.messages.length, 0);
  await stillServes();
});

test('6 + 10. a valid prefix over garbage protobuf fails the stream with an ASCII grpc-message, never status 0', async () => {
  const out = await exchange({ send: (s) => void s.write(grpcFrame(Buffer.from([0xff, 0xff, 0xff]))) });
  // grpc-js path: trailers-only 13 INTERNAL, 'Error%20deserializing%20request'.
  assert.notEqual(out.grpcStatus, undefined, `no grpc-status (RST_STREAM ${out.rstCode})`);
  assert.notEqual(out.grpcStatus, 0);
  noTokenIn(out);
  assert.match(out.grpcMessage ?? '', /^[\x20-\x7e]*$/);
  await stillServes();
});

test('7. 200 streams reset right after request_headers leave no stream open, and the connection still serves', async () => {
  const closes: Array<Promise<void>> = [];
  for (let i = 0; i < 200; i++) {
    const stream = session.request({ ':method': 'POST', ':path': PROCESS_PATH, 'content-type': 'application/grpc', te: 'trailers' }, { endStream: false });
    stream.on('error', () => {});
    closes.push(new Promise((resolve) => stream.on('close', resolve)));
    stream.write(requestHeadersFrame(), () => stream.close(http2.constants.NGHTTP2_CANCEL));
  }
  await Promise.all(closes);
  for (let waited = 0; listener.openStreams > 0 && waited < 5000; waited += 20) await sleep(20);
  assert.equal(listener.openStreams, 0);
  await stillServes();
});

test('8. gRPC health Check on the same port answers SERVING', async () => {
  const out = await exchange({ path: '/grpc.health.v1.Health/Check', send: (s) => void s.end(grpcFrame(Buffer.alloc(0))) });
  assert.equal(out.grpcStatus, 0);
  // HealthCheckResponse { status: SERVING (1) }: field 1, varint.
  assert.deepEqual([...out.messages[0] ?? []], [0, 0, 0, 0, 2, 0x08, 0x01]);
});

test('9. an unknown method on the same port gets UNIMPLEMENTED', async () => {
  const out = await exchange({ path: '/nope.Service/Method', send: (s) => void s.end(grpcFrame(Buffer.alloc(0))) });
  assert.equal(out.grpcStatus, 12);
  assert.equal(out.messages.length, 0);
});

test('11. x-oauth2-profile picks the profile; an unknown one is denied; none is "default"', async () => {
  const send = (s: ClientHttp2Stream): void => void s.write(requestHeadersFrame());
  const unknown = await exchange({ profile: 'nope', send, endAfter: 1 });
  assert.equal(unknown.messages.length, 1);
  const deny = decode(unknown.messages[0]!);
  assert.equal(deny.response, 'immediate_response');
  // grpc-js path today: HTTP 500 with the coded JSON error.
  assert.equal(deny.immediate_response.status?.code, 'InternalServerError');
  assert.equal(JSON.parse(Buffer.from(deny.immediate_response.body).toString('utf8')).error, 'OAUTH2_ERR_UNKNOWN_PROFILE');
  noTokenIn(unknown);
  const other = await exchange({ profile: 'other', send, endAfter: 1 });
  assert.equal(authorization(other.messages[0]!), 'Bearer eyJ.other');
  const none = await exchange({ send, endAfter: 1 });
  assert.equal(authorization(none.messages[0]!), 'Bearer eyJ.default');
  // The same through a grpc-js client built from the upstream protos.
  const client = new ExtProcClient(address);
  try {
    assert.equal(setHeaders((await client.exchange(requestHeaders(TYPICAL_HEADERS))).reply).authorization, 'Bearer eyJ.default');
    assert.equal((await client.exchange(requestHeaders(TYPICAL_HEADERS), { profile: 'nope' })).reply.response, 'immediate_response');
  } finally {
    client.close();
  }
});

test('12. messages started and never finished are bounded all together: past LIMITS.maxPartialBytes a stream gets RESOURCE_EXHAUSTED, and the budget is given back', async () => {
  // Each stream announces a message just under the size limit and sends all of it but one byte.
  const size = LIMITS.maxMessageBytes - 16;
  const streams = Math.ceil(LIMITS.maxPartialBytes / size) + 8;
  const prefix = Buffer.alloc(5);
  prefix.writeUInt32BE(size, 1);
  const almost = Buffer.concat([prefix, Buffer.alloc(size - 1, 0x0a)]);
  const on = await openSession(address);
  try {
    const outcomes = await Promise.all(Array.from({ length: streams }, () => exchange({ send: (s) => void s.write(almost) }, on).catch(() => undefined)));
    const refused = outcomes.filter((o) => o?.grpcStatus === 8).length;
    assert.ok(refused >= 8, `${refused} of ${streams} streams got RESOURCE_EXHAUSTED`);
    // The others held their part of the budget until the listener gave up on them (2 s): they
    // got DEADLINE_EXCEEDED before the client's own 5 s limit.
    for (const o of outcomes) {
      assert.equal(o?.stuck, false);
      assert.ok(o.grpcStatus === 8 || o.grpcStatus === 4, `status ${o.grpcStatus}`);
    }
  } finally {
    on.destroy();
  }
  // The streams that were only waiting for their last byte are gone with the connection: the
  // whole budget is free again, so a full-size message is read.
  for (let i = 0; i < 100 && listener.openStreams > 0; i++) await sleep(50);
  assert.equal(listener.openStreams, 0);
  const full = await exchange({ send: (s) => void s.write(Buffer.concat([almost, Buffer.from([0x0a])])) });
  assert.notEqual(full.grpcStatus, 8, 'the budget was not given back');
  assert.notEqual(full.grpcStatus, 0); // not a ProcessingRequest: an error status, but not for its size
  await stillServes();
});

test('13. a message written one byte per DATA frame is put together and answered', async () => {
  // Each byte its own frame: the listener must copy each byte once, not the message so far.
  const bytes = requestHeadersFrame();
  const out = await exchange({
    endAfter: 1,
    async send(stream) {
      for (let i = 0; i < bytes.length; i++) {
        stream.write(bytes.subarray(i, i + 1));
        await new Promise((resolve) => setImmediate(resolve));
      }
    },
  });
  assert.equal(out.messages.length, 1);
  assert.equal(authorization(out.messages[0]!), 'Bearer eyJ.default');
  assert.equal(out.grpcStatus, 0);
});
