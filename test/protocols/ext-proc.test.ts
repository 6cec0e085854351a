// The stream handler, served by a real grpc-js server and spoken to by a client built from the
// upstream Envoy protos. Tokens are plain values here (the token cache has its own tests).
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { parseConfig } from '../../src/config.ts';
import type { ExtProcService } from '../../src/protocols/ext-proc.ts';
import { createLogger } from '../../src/logger.ts';
import { Metrics } from '../../src/metrics.ts';
import type { Token } from '../../src/token.ts';
import { ExtProcClient, requestHeaders, setHeaders, TYPICAL_HEADERS, upstreamMethod } from '../helpers/extproc-client.ts';
import { serveExtProc, type ExtProcServer } from '../helpers/ext-proc-server.ts';

const config = parseConfig(`
profiles:
  default: { tokenUrl: 'https://idp.test/token', clientId: a, clientSecret: b }
  backend-b: { tokenUrl: 'https://idp.test/token', clientId: a, clientSecret: b, removeHeaders: [x-api-key] }
  lenient: { tokenUrl: 'https://idp.test/token', clientId: a, clientSecret: b, onFailure: allow }
`, { env: {} });

const tokens: Record<string, Token | undefined> = {};
const token = (accessToken: string, tokenType = 'Bearer'): Token => ({ accessToken, tokenType, obtainedAt: 0, expiresAt: 1, refreshInSeconds: undefined });

const logLines: Array<Record<string, any>> = [];
const logger = createLogger('debug', { write: (line: string) => void logLines.push(JSON.parse(line)) });
const metrics = new Metrics({ defaultMetrics: false });
let server: ExtProcServer;
let service: ExtProcService;
let address: string;
let client: ExtProcClient;

before(async () => {
  server = await serveExtProc({
    profiles: Object.values(config.profiles).map((p) => ({ config: p, tokens: { current: () => tokens[p.name] } })),
    logger,
    metrics,
  });
  service = server.service;
  address = server.address;
  client = new ExtProcClient(address);
});

after(() => {
  client.close();
  server.close();
});

const setHeader = (key: string, value: string) => ({ header: { key, raw_value: Buffer.from(value) }, append_action: 'OVERWRITE_IF_EXISTS_OR_ADD' });

/** The whole request_headers reply: authorization set (and :path, when given), headers removed. */
const authorizationMutation = (value: string, remove = ['ocp-apim-subscription-key'], path?: string) => ({
  response: 'request_headers',
  request_headers: {
    response: {
      header_mutation: {
        set_headers: path === undefined ? [setHeader('authorization', value)] : [setHeader('authorization', value), setHeader(':path', path)],
        remove_headers: remove,
      },
    },
  },
});

/** TYPICAL_HEADERS with another :path. */
const withPath = (path: string): Array<[string, string]> => TYPICAL_HEADERS.map(([k, v]): [string, string] => (k === ':path' ? [k, path] : [k, v]));

test('request_headers: the token overwrites authorization and the subscription key is removed; then the stream ends OK', async () => {
  tokens.default = token('eyJ.abc-def_ghi');
  const { reply, status } = await client.exchange(requestHeaders(TYPICAL_HEADERS));
  assert.deepEqual(reply, authorizationMutation('Bearer eyJ.abc-def_ghi'));
  assert.equal(status?.code, grpc.status.OK);
});

test('the profile comes from x-oauth2-profile metadata; its own removals apply', async () => {
  tokens['backend-b'] = token('token-for-b', 'DPoP');
  const { reply } = await client.exchange(requestHeaders(TYPICAL_HEADERS), { profile: 'backend-b' });
  assert.deepEqual(reply, authorizationMutation('DPoP token-for-b', ['ocp-apim-subscription-key', 'x-api-key']));
});

test('a new token is used from the next request on', async () => {
  tokens.default = token('first');
  assert.deepEqual(setHeaders((await client.exchange(requestHeaders(TYPICAL_HEADERS))).reply), { authorization: 'Bearer first' });
  tokens.default = token('second');
  assert.deepEqual(setHeaders((await client.exchange(requestHeaders(TYPICAL_HEADERS))).reply), { authorization: 'Bearer second' });
});

test('a subscription key in the query string is removed from :path too; the other parameters stay as they were', async () => {
  tokens.default = token('t');
  const headers = withPath('/orders/42?a=1&subscription-key=0123456789abcdef&b=%2F+x');
  const { reply } = await client.exchange(requestHeaders(headers));
  assert.deepEqual(reply, authorizationMutation('Bearer t', undefined, '/orders/42?a=1&b=%2F+x'));
  // The same bytes elsewhere (a referer) do not touch :path.
  const elsewhere = [...TYPICAL_HEADERS, ['referer', 'https://portal.test/?subscription-key=zzz'] as [string, string]];
  assert.deepEqual((await client.exchange(requestHeaders(elsewhere))).reply, authorizationMutation('Bearer t'));
  // Without a token and onFailure allow, the query is still cleaned.
  tokens.lenient = undefined;
  const lenient = (await client.exchange(requestHeaders(headers), { profile: 'lenient' })).reply;
  assert.deepEqual(lenient.request_headers.response.header_mutation.set_headers, [setHeader(':path', '/orders/42?a=1&b=%2F+x')]);
});

test('a percent-encoded or differently cased name is the same parameter: it is removed too', async () => {
  tokens.default = token('t');
  for (const [query, kept] of [
    ['?subscription%2Dkey=0123456789abcdef&a=1', '?a=1'],
    ['?a=%2F&%73ubscription-key=0123456789abcdef', '?a=%2F'],
    ['?subscription%2dkey=0123456789abcdef', ''],
    ['?Subscription-Key=0123456789abcdef&b=2', '?b=2'],
  ]) {
    const { reply } = await client.exchange(requestHeaders(withPath(`/orders/42${query}`)));
    assert.deepEqual(reply, authorizationMutation('Bearer t', undefined, `/orders/42${kept}`), query);
  }
  // A % in the query without such a parameter, or one elsewhere in the headers, leaves :path alone.
  assert.deepEqual((await client.exchange(requestHeaders(withPath('/orders/42?q=%2F')))).reply, authorizationMutation('Bearer t'));
  const cookie = [...TYPICAL_HEADERS, ['cookie', 'a=%7B%7D; subscription-key=zzz'] as [string, string]];
  assert.deepEqual((await client.exchange(requestHeaders(cookie))).reply, authorizationMutation('Bearer t'));
});

test('every spelling a backend framework reads as subscription-key is removed from :path (docs/query-names.md)', async () => {
  tokens.default = token('t');
  for (const name of [
    '+subscription-key', '%20subscription-key', 'subscription-key%00', 'subscription-key%00x', 'subscription-key[]',
    'subscription-key[0]', 'subscription-key%5B%5D', '[subscription-key]', 'subscription-key.x', '!subscription-key',
    '%C5%BFubscription-key', 'subscription-%E2%84%AAey', 'subscr%C4%B1ption-key', 'subscription%252Dkey', '%u0073ubscription-key',
  ]) {
    const { reply } = await client.exchange(requestHeaders(withPath(`/orders/42?a=1&${name}=0123456789abcdef&b=2`)));
    assert.deepEqual(reply, authorizationMutation('Bearer t', undefined, '/orders/42?a=1&b=2'), name);
  }
  // ; separates parameters for Rack 2, Python before 3.9.2 and Go with AllowQuerySemicolons.
  const { reply } = await client.exchange(requestHeaders(withPath('/orders/42?a=1;subscription-key=0123456789abcdef&b=2')));
  assert.deepEqual(reply, authorizationMutation('Bearer t', undefined, '/orders/42?a=1&b=2'));
  // A name that only looks alike stays, and the request stays on the prebuilt reply.
  assert.deepEqual((await client.exchange(requestHeaders(withPath('/orders/42?subscription-keys=1&subscription_key=2')))).reply, authorizationMutation('Bearer t'));
});

test(':path is bytes: stripping keeps bytes above 0x7F and invalid UTF-8 exactly', async () => {
  tokens.default = token('t');
  const path = Buffer.from('/caf\xc3\xa9/\xff?q=\xe9\x80&subscription-key=0123456789abcdef&r=\xc3', 'latin1');
  const message = { request_headers: { headers: { headers: [
    ...TYPICAL_HEADERS.filter(([k]) => k !== ':path').map(([key, value]) => ({ key, raw_value: Buffer.from(value) })),
    { key: ':path', raw_value: path },
  ] }, end_of_stream: true } };
  const { reply } = await client.exchange(message);
  const set = reply.request_headers.response.header_mutation.set_headers as Array<{ header: { key: string; raw_value: Buffer } }>;
  assert.deepEqual(set.map((o) => o.header.key), ['authorization', ':path']);
  assert.deepEqual(Buffer.from(set[1]!.header.raw_value), Buffer.from('/caf\xc3\xa9/\xff?q=\xe9\x80&r=\xc3', 'latin1'));
});

test('a removed or overwritten header sent with _ for - is removed under that spelling too', async () => {
  tokens.default = token('t');
  const spelled = [...TYPICAL_HEADERS, ['ocp_apim_subscription_key', 'k1'], ['ocp-apim_subscription-key', 'k2']] as Array<[string, string]>;
  assert.deepEqual((await client.exchange(requestHeaders(spelled))).reply,
    authorizationMutation('Bearer t', ['ocp-apim-subscription-key', 'ocp_apim_subscription_key', 'ocp-apim_subscription-key']));
  // With a query parameter to strip as well, both changes are in the one answer.
  const both = [...withPath('/orders/42?subscription-key=k3'), ['ocp_apim_subscription_key', 'k1']] as Array<[string, string]>;
  assert.deepEqual((await client.exchange(requestHeaders(both))).reply,
    authorizationMutation('Bearer t', ['ocp-apim-subscription-key', 'ocp_apim_subscription_key'], '/orders/42'));
  // A profile's own removeHeaders too; and without a token under onFailure allow.
  tokens['backend-b'] = token('b');
  const apiKey = [...TYPICAL_HEADERS, ['x_api_key', 'k4']] as Array<[string, string]>;
  assert.deepEqual((await client.exchange(requestHeaders(apiKey), { profile: 'backend-b' })).reply,
    authorizationMutation('Bearer b', ['ocp-apim-subscription-key', 'x-api-key', 'x_api_key']));
  tokens.lenient = undefined;
  assert.deepEqual((await client.exchange(requestHeaders(spelled), { profile: 'lenient' })).reply, {
    response: 'request_headers',
    request_headers: { response: { header_mutation: { remove_headers: ['authorization', 'ocp-apim-subscription-key', 'ocp_apim_subscription_key', 'ocp-apim_subscription-key'] } } },
  });
  // The same bytes in a value, or a longer name, change nothing.
  const lookalikes = [...TYPICAL_HEADERS, ['x-note', 'ocp_apim_subscription_key'], ['ocp_apim_subscription_keys', 'x']] as Array<[string, string]>;
  assert.deepEqual((await client.exchange(requestHeaders(lookalikes))).reply, authorizationMutation('Bearer t'));
});

test('the debug line names what the client sent, never a query value', async () => {
  tokens.default = token('t');
  logLines.length = 0;
  const headers = [...withPath('/orders/42?subscription-key=0123456789abcdef0123456789abcdef&q=private-search'), ['ocp_apim_subscription_key', 'k1']] as Array<[string, string]>;
  await client.exchange(requestHeaders(headers));
  const record = logLines.findLast((l) => l.msg === 'request_headers answered');
  assert.deepEqual({ ...record, time: undefined }, {
    level: 'debug', service: 'oauth2-extproc', time: undefined, msg: 'request_headers answered',
    profile: 'default', outcome: 'injected', method: 'GET', path: '/orders/42',
    clientSent: ['authorization', 'ocp-apim-subscription-key', 'ocp_apim_subscription_key'],
  });
  assert.ok(!JSON.stringify(logLines).includes('private-search'));
});

test('every other event gets an empty reply of its own kind, one per message, in order, on one stream', async () => {
  tokens.default = token('t');
  const call = client.open();
  const replies: Array<Record<string, any>> = [];
  const done = new Promise<grpc.StatusObject>((resolve) => call.on('status', resolve));
  call.on('data', (r: Record<string, any>) => replies.push(r));
  call.write(requestHeaders(TYPICAL_HEADERS, false));
  call.write({ request_body: { body: Buffer.from('{"a":1}'), end_of_stream: false } });
  call.write({ request_body: { body: Buffer.from('{"b":2}'), end_of_stream: true } });
  call.write({ request_trailers: { trailers: { headers: [] } } });
  call.write({ response_headers: { headers: { headers: [{ key: ':status', raw_value: Buffer.from('200') }] } } });
  call.write({ response_body: { body: Buffer.from('ok'), end_of_stream: true } });
  call.write({ response_trailers: { trailers: { headers: [] } } });
  call.end();
  assert.equal((await done).code, grpc.status.OK);
  assert.deepEqual(replies.map((r) => r.response), [
    'request_headers', 'request_body', 'request_body', 'request_trailers', 'response_headers', 'response_body', 'response_trailers',
  ]);
  assert.deepEqual(replies.slice(1).map((r) => r[r.response]), [{}, {}, {}, {}, {}, {}]);
});

test('headers sent the pre-1.27 way (value, no raw_value) are answered the same', async () => {
  tokens.default = token('t');
  const message = { request_headers: { headers: { headers: TYPICAL_HEADERS.map(([key, value]) => ({ key, value })) }, end_of_stream: true } };
  const { reply } = await client.exchange(message);
  assert.deepEqual(reply, authorizationMutation('Bearer t'));
  const record = logLines.findLast((l) => l.msg === 'request_headers answered');
  assert.deepEqual({ ...record, time: undefined }, {
    level: 'debug', service: 'oauth2-extproc', time: undefined, msg: 'request_headers answered',
    profile: 'default', outcome: 'injected', method: 'GET', path: '/orders/42',
    clientSent: ['authorization', 'ocp-apim-subscription-key'],
  });
});

test('no token, default policy: an immediate 503 with a JSON body naming the profile', async () => {
  tokens.default = undefined;
  const { reply } = await client.exchange(requestHeaders(TYPICAL_HEADERS));
  assert.equal(reply.response, 'immediate_response');
  assert.equal(reply.immediate_response.status.code, 'ServiceUnavailable');
  assert.deepEqual(JSON.parse(reply.immediate_response.body.toString()), {
    error: 'OAUTH2_ERR_NO_TOKEN', message: 'no usable access token for this profile', profile: 'default',
  });
  assert.deepEqual(setHeaders({ request_headers: { response: { header_mutation: reply.immediate_response.headers } } }), {
    'content-type': 'application/json', 'cache-control': 'no-store',
  });
});

test('no token, onFailure allow: continue without authorization (the caller\'s is removed) and without the key', async () => {
  tokens.lenient = undefined;
  const { reply } = await client.exchange(requestHeaders(TYPICAL_HEADERS), { profile: 'lenient' });
  assert.deepEqual(reply, {
    response: 'request_headers',
    request_headers: { response: { header_mutation: { remove_headers: ['authorization', 'ocp-apim-subscription-key'] } } },
  });
});

test('an unknown profile is denied with 500 and logged once, naming the metadata key', async () => {
  logLines.length = 0;
  for (let i = 0; i < 3; i++) {
    const { reply } = await client.exchange(requestHeaders(TYPICAL_HEADERS), { profile: 'nope' });
    assert.equal(reply.immediate_response.status.code, 'InternalServerError');
    assert.deepEqual(JSON.parse(reply.immediate_response.body.toString()), {
      error: 'OAUTH2_ERR_UNKNOWN_PROFILE', message: 'the stream names a profile that is not configured', profile: 'nope',
    });
  }
  const warnings = logLines.filter((l) => l.level === 'warn');
  assert.equal(warnings.length, 1);
  assert.deepEqual(warnings[0]!.configured, ['default', 'backend-b', 'lenient']);
  assert.equal(warnings[0]!.metadataKey, 'x-oauth2-profile');
  assert.equal(warnings[0]!.profile, 'nope');
});

test('observability mode: no reply (Envoy forbids one), the stream still ends cleanly', async () => {
  const call = client.open();
  let replies = 0;
  call.on('data', () => replies++);
  const status = new Promise<grpc.StatusObject>((resolve) => call.on('status', resolve));
  call.write({ ...requestHeaders(TYPICAL_HEADERS), observability_mode: true });
  call.end();
  assert.equal((await status).code, grpc.status.OK);
  assert.equal(replies, 0);
});

/** A client that sends raw bytes as the message, to play a broken or future Envoy. */
async function sendRaw(bytes: Buffer): Promise<{ replies: number; status: grpc.StatusObject }> {
  const method = { ...upstreamMethod(), requestSerialize: (b: Buffer) => b };
  const Ctor = grpc.makeGenericClientConstructor({ Process: method } as grpc.ServiceDefinition, 'ExternalProcessor');
  const raw = new Ctor(address, grpc.credentials.createInsecure()) as any;
  const call = raw.Process(new grpc.Metadata()) as grpc.ClientDuplexStream<Buffer, unknown>;
  let replies = 0;
  call.on('data', () => replies++);
  call.on('error', () => {});
  const status = await new Promise<grpc.StatusObject>((resolve) => {
    call.on('status', resolve);
    call.write(bytes);
  });
  raw.close();
  return { replies, status };
}

test('a malformed message fails the stream with an error status, never a clean close', async () => {
  const { replies, status } = await sendRaw(Buffer.from([0x12, 0xff, 0x01]));
  assert.equal(replies, 0);
  assert.notEqual(status.code, grpc.status.OK);
});

test('a message with no request kind this processor knows fails the stream with INVALID_ARGUMENT', async () => {
  // Only metadata_context (field 8, empty): no oneof member set.
  const { replies, status } = await sendRaw(Buffer.from([0x42, 0x00]));
  assert.equal(replies, 0);
  assert.equal(status.code, grpc.status.INVALID_ARGUMENT);
});

test('requests are counted by profile and outcome; open streams return to zero', async () => {
  const text = await metrics.registry.getSingleMetricAsString('oauth2_extproc_requests_total');
  assert.match(text, /oauth2_extproc_requests_total\{profile="default",outcome="injected"\} \d+/);
  assert.match(text, /oauth2_extproc_requests_total\{profile="default",outcome="denied"\} 1/);
  assert.match(text, /oauth2_extproc_requests_total\{profile="lenient",outcome="allowed_without_token"\} 3/);
  assert.match(text, /oauth2_extproc_requests_total\{profile="nope",outcome="unknown_profile"\} 3/);
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.equal(service.streamsOpen, 0);
  assert.match(await metrics.registry.getSingleMetricAsString('oauth2_extproc_open_streams'), /oauth2_extproc_open_streams 0/);
});

test('no log line at any level carries a token or the caller\'s key or authorization', () => {
  const all = JSON.stringify(logLines);
  for (const secret of ['eyJ.abc-def_ghi', 'token-for-b', 'forged-by-the-caller', '0123456789abcdef0123456789abcdef']) {
    assert.ok(!all.includes(secret), `log contains ${secret}`);
  }
});
