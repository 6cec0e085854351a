// Every path on which the sidecar cannot give a request its token must fail closed: an
// immediate_response that carries a status, or a gRPC error status. Never a clean close with OK
// before request_headers is answered, which Envoy reads as "continue unchanged" (the caller's key
// goes through, no token). Each case below fails if its path closes the stream cleanly instead.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { parseConfig } from '../src/config.ts';
import { createLogger } from '../src/logger.ts';
import { Metrics } from '../src/metrics.ts';
import { PROCESS_PATH } from '../src/protocols/ext-proc-wire.ts';
import type { Token } from '../src/token.ts';
import { requestHeaders, TYPICAL_HEADERS, upstreamMethod } from './helpers/extproc-client.ts';
import { serveExtProc, type ExtProcServer } from './helpers/ext-proc-server.ts';

const config = parseConfig(`
profiles:
  default: { tokenUrl: 'https://idp.test/token', clientId: a, clientSecret: b }
  lenient: { tokenUrl: 'https://idp.test/token', clientId: a, clientSecret: b, onFailure: allow }
  broken: { tokenUrl: 'https://idp.test/token', clientId: a, clientSecret: b }
  broken-lenient: { tokenUrl: 'https://idp.test/token', clientId: a, clientSecret: b, onFailure: allow }
`, { env: {} });

const token: Token = { accessToken: 'eyJ.good', tokenType: 'Bearer', obtainedAt: 0, expiresAt: 1, refreshInSeconds: undefined };
/** A token provider with a bug: what the handler's safety net is there for. */
const throwing = { current: (): Token | undefined => { throw new TypeError('a bug in the token provider'); } };
const providers: Record<string, { current(): Token | undefined }> = {
  default: { current: () => undefined },
  lenient: { current: () => undefined },
  broken: throwing,
  'broken-lenient': throwing,
};

const logLines: Array<Record<string, any>> = [];
const logger = createLogger('info', { write: (line: string) => void logLines.push(JSON.parse(line)) });
let server: ExtProcServer;
let address: string;
let client: grpc.Client;
const upstream = upstreamMethod();

before(async () => {
  server = await serveExtProc({
    profiles: Object.values(config.profiles).map((p) => ({ config: p, tokens: { current: () => providers[p.name]!.current() } })),
    logger,
    metrics: new Metrics({ defaultMetrics: false }),
  });
  address = server.address;
  client = new grpc.Client(address, grpc.credentials.createInsecure());
});

after(() => {
  client.close();
  server.close();
});

interface Outcome {
  replies: Array<Record<string, any>>;
  code: grpc.status;
}

/**
 * Sends raw bytes as one ProcessingRequest, half-closes like Envoy's graceful close, and collects
 * every reply and the final status.
 */
function converse(bytes: Buffer, profile?: string): Promise<Outcome> {
  const metadata = new grpc.Metadata();
  if (profile !== undefined) metadata.set('x-oauth2-profile', profile);
  const call = client.makeBidiStreamRequest(PROCESS_PATH, (b: Buffer) => b, upstream.responseDeserialize, metadata);
  const replies: Array<Record<string, any>> = [];
  return new Promise((resolve) => {
    call.on('data', (reply: Record<string, any>) => {
      replies.push(reply);
      call.end();
    });
    call.on('error', () => {});
    call.on('status', (status: grpc.StatusObject) => resolve({ replies, code: status.code }));
    call.write(bytes);
  });
}

const headersMessage = (): Buffer => upstream.requestSerialize(requestHeaders(TYPICAL_HEADERS));

const STATUS_NAMES: Record<number, string> = { 500: 'InternalServerError', 503: 'ServiceUnavailable' };

/** The outcome is a deny with this status and code in its JSON body, and nothing else. */
function assertDenied(outcome: Outcome, status: number, errorCode: string): void {
  assert.equal(outcome.replies.length, 1, `one reply expected, got ${JSON.stringify(outcome.replies)}`);
  const immediate = outcome.replies[0]!.immediate_response;
  assert.ok(immediate !== undefined, `an immediate_response expected, got ${JSON.stringify(outcome.replies[0])}`);
  // envoy.type.v3.StatusCode, decoded by name.
  assert.equal(immediate.status.code, STATUS_NAMES[status]);
  assert.equal(JSON.parse(Buffer.from(immediate.body).toString('utf8')).error, errorCode);
}

/** No reply and a non-OK status: Envoy fails the request (failure_mode_allow: false). */
function assertStreamFailed(outcome: Outcome): void {
  assert.deepEqual(outcome.replies, []);
  assert.notEqual(outcome.code, grpc.status.OK, 'a clean close before request_headers is answered forwards the request unchanged');
}

test('a bug while answering (the handler\'s safety net) denies with 500 OAUTH2_ERR_INTERNAL and logs the error', async () => {
  const outcome = await converse(headersMessage(), 'broken');
  assertDenied(outcome, 500, 'OAUTH2_ERR_INTERNAL');
  const logged = logLines.find((l) => l.msg === 'ext_proc handler failed; request denied');
  assert.equal(logged?.level, 'error');
  assert.equal(logged?.profile, 'broken');
  assert.equal(logged?.error?.message, 'a bug in the token provider');
});

test('the safety net denies even for an onFailure: allow profile: a bug is not a missing token', async () => {
  assertDenied(await converse(headersMessage(), 'broken-lenient'), 500, 'OAUTH2_ERR_INTERNAL');
});

test('no usable token, onFailure: deny: 503 OAUTH2_ERR_NO_TOKEN', async () => {
  assertDenied(await converse(headersMessage()), 503, 'OAUTH2_ERR_NO_TOKEN');
});

test('no usable token, onFailure: allow: the request goes on, without authorization and without the key', async () => {
  const outcome = await converse(headersMessage(), 'lenient');
  assert.equal(outcome.replies.length, 1);
  const removed: string[] = outcome.replies[0]!.request_headers.response.header_mutation.remove_headers;
  assert.ok(removed.includes('authorization') && removed.includes('ocp-apim-subscription-key'), JSON.stringify(removed));
});

test('an unknown profile: 500 OAUTH2_ERR_UNKNOWN_PROFILE', async () => {
  assertDenied(await converse(headersMessage(), 'no-such-profile'), 500, 'OAUTH2_ERR_UNKNOWN_PROFILE');
});

test('a message that is not a ProcessingRequest fails the stream with an error status', async () => {
  // Field 2 (request_headers) announced with a length far past the end of the message.
  assertStreamFailed(await converse(Buffer.from([0x12, 0xff, 0x01, 0x00])));
});

test('a ProcessingRequest with no request kind this processor knows fails the stream', async () => {
  // Only field 8 (metadata_context, an empty message), no member of the `request` oneof.
  assertStreamFailed(await converse(Buffer.from([0x42, 0x00])));
});

test('a stream the client ends before sending request_headers ends with an error status, not OK', async () => {
  // Envoy never does this; whatever reads the stream must still not see "continue unchanged".
  const call = client.makeBidiStreamRequest(PROCESS_PATH, (b: Buffer) => b, upstream.responseDeserialize, new grpc.Metadata());
  const replies: unknown[] = [];
  const code = await new Promise<grpc.status>((resolve) => {
    call.on('data', (reply: unknown) => replies.push(reply));
    call.on('error', () => {});
    call.on('status', (status: grpc.StatusObject) => resolve(status.code));
    call.end();
  });
  assertStreamFailed({ replies: replies as Outcome['replies'], code });
});

test('the same paths answer normally once the provider has a token (the cases above are not vacuous)', async () => {
  providers.default = { current: () => token };
  try {
    const outcome = await converse(headersMessage());
    assert.equal(outcome.replies.length, 1);
    assert.ok(outcome.replies[0]!.request_headers !== undefined);
    assert.equal(outcome.code, grpc.status.OK);
  } finally {
    providers.default = { current: () => undefined };
  }
});
