// The SDS server, served by a real grpc-js server and spoken to by clients built from the
// upstream Envoy protos, as Envoy's SDS subscription speaks: initial request, ACK (the last
// nonce echoed with its version), NACK (error_detail), delta subscriptions and fetch.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { parseConfig } from '../../src/config.ts';
import { createLogger } from '../../src/logger.ts';
import { SdsService, sdsService, SECRET_TYPE_URL, type WatchedTokens } from '../../src/protocols/sds.ts';
import type { Token } from '../../src/token.ts';
import { decodeSecret, Replies, upstreamClient } from '../helpers/xds-client.ts';

const config = parseConfig(`
profiles:
  default: { tokenUrl: 'https://idp.test/token', clientId: a, clientSecret: b }
  reports: { tokenUrl: 'https://idp.test/token', clientId: a, clientSecret: b }
`, { env: {} });

/** A profile's tokens, set by the test; listeners hear each change as a token cache's do. */
class Tokens implements WatchedTokens {
  private token: Token | undefined;
  private readonly listeners = new Set<() => void>();
  current(): Token | undefined {
    return this.token;
  }
  onChange(listener: () => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
  set(accessToken: string | undefined, tokenType = 'Bearer'): void {
    this.token = accessToken === undefined ? undefined : { accessToken, tokenType, obtainedAt: 0, expiresAt: 1, refreshInSeconds: undefined };
    for (const listener of this.listeners) listener();
  }
}

const tokens = { default: new Tokens(), reports: new Tokens() };
const logLines: Array<Record<string, any>> = [];
const logger = createLogger('debug', { write: (line: string) => void logLines.push(JSON.parse(line)) });
const service = new SdsService({
  profiles: Object.values(config.profiles).map((p) => ({ config: p, tokens: tokens[p.name as keyof typeof tokens] })),
  logger,
});

let server: grpc.Server;
let client: grpc.Client & Record<string, any>;
const FILE = 'envoy/service/secret/v3/sds.proto';
const SERVICE = 'envoy.service.secret.v3.SecretDiscoveryService';

before(async () => {
  tokens.default.set('t1');
  server = new grpc.Server();
  server.addService(sdsService, service.handlers);
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
  });
  client = upstreamClient(FILE, SERVICE, `127.0.0.1:${port}`);
});

after(() => {
  client.close();
  server.forceShutdown();
});

function secrets(response: Record<string, any>): Record<string, string> {
  return Object.fromEntries((response.resources ?? []).map((any: any) => {
    const s = decodeSecret(any);
    assert.equal(s.typeUrl, SECRET_TYPE_URL);
    return [s.name, s.value];
  }));
}

function openSotw(): { call: grpc.ClientDuplexStream<object, Record<string, any>>; replies: Replies<Record<string, any>> } {
  const call = client.StreamSecrets() as grpc.ClientDuplexStream<object, Record<string, any>>;
  return { call, replies: new Replies(call) };
}

const ack = (response: Record<string, any>, names: string[]) => ({
  version_info: response.version_info, resource_names: names, type_url: SECRET_TYPE_URL, response_nonce: response.nonce,
});

test('StreamSecrets: the initial request is answered with each named secret, valued `<token_type> <access_token>`', async () => {
  const { call, replies } = openSotw();
  call.write({ node: { id: 'envoy-1', cluster: 'edge' }, resource_names: ['default'], type_url: SECRET_TYPE_URL });
  const first = await replies.next();
  assert.equal(first.type_url, SECRET_TYPE_URL);
  assert.match(first.version_info, /^\d+$/);
  assert.ok(first.nonce);
  assert.deepEqual(secrets(first), { default: 'Bearer t1' });
  // ACK: nothing more until something changes.
  call.write(ack(first, ['default']));
  assert.ok(await replies.none());
  call.end();
});

test('a new token is pushed at once with a new version and nonce; the loss of one as an empty value', async () => {
  const { call, replies } = openSotw();
  call.write({ resource_names: ['default'], type_url: SECRET_TYPE_URL });
  const first = await replies.next();
  call.write(ack(first, ['default']));
  tokens.default.set('t2');
  const pushed = await replies.next();
  assert.deepEqual(secrets(pushed), { default: 'Bearer t2' });
  assert.notEqual(pushed.version_info, first.version_info);
  assert.notEqual(pushed.nonce, first.nonce);
  call.write(ack(pushed, ['default']));
  assert.ok(await replies.none(100)); // the ACK has arrived
  // A change of another profile is not pushed to a stream that does not watch it.
  tokens.reports.set('r1');
  assert.ok(await replies.none());
  tokens.default.set(undefined);
  const lost = await replies.next();
  assert.deepEqual(secrets(lost), { default: '' });
  call.write(ack(lost, ['default']));
  tokens.default.set('t3', 'DPoP');
  assert.deepEqual(secrets(await replies.next()), { default: 'DPoP t3' });
  call.end();
});

test('NACK: logged once, the same version is not sent again; the next change is', async () => {
  const { call, replies } = openSotw();
  call.write({ resource_names: ['default', 'reports'], type_url: SECRET_TYPE_URL });
  const first = await replies.next();
  assert.deepEqual(Object.keys(secrets(first)).sort(), ['default', 'reports']);
  const before = logLines.length;
  const nack = { ...ack(first, ['default', 'reports']), version_info: '', error_detail: { code: 3, message: 'Proto constraint validation failed' } };
  call.write(nack);
  call.write(nack);
  assert.ok(await replies.none());
  const logged = logLines.slice(before).filter((l) => /SDS NACK/.test(l.msg));
  assert.equal(logged.length, 1);
  assert.equal(logged[0]!.reason, 'Proto constraint validation failed');
  assert.equal(logged[0]!.level, 'warn');
  tokens.reports.set('r2');
  const next = await replies.next();
  assert.deepEqual(secrets(next), { default: 'DPoP t3', reports: 'Bearer r2' });
  call.end();
});

test('a request echoing an older nonce is stale and ignored; a changed subscription is answered', async () => {
  const { call, replies } = openSotw();
  call.write({ resource_names: ['default'], type_url: SECRET_TYPE_URL });
  const first = await replies.next();
  tokens.default.set('t4');
  const second = await replies.next();
  call.write(ack(first, ['default', 'reports'])); // stale: answers the first response
  assert.ok(await replies.none());
  call.write(ack(second, ['default', 'reports']));
  const widened = await replies.next();
  assert.deepEqual(secrets(widened), { default: 'Bearer t4', reports: 'Bearer r2' });
  call.end();
});

test('a name that is no profile is answered with an empty value and logged once', async () => {
  const before = logLines.length;
  for (let i = 0; i < 2; i++) {
    const { call, replies } = openSotw();
    call.write({ resource_names: ['default', 'nope'], type_url: SECRET_TYPE_URL });
    assert.deepEqual(secrets(await replies.next()), { default: 'Bearer t4', nope: '' });
    call.end();
  }
  const logged = logLines.slice(before).filter((l) => l.secret === 'nope');
  assert.equal(logged.length, 1);
  assert.deepEqual(logged[0]!.configured, ['default', 'reports']);
  // No log line holds a token.
  assert.ok(!JSON.stringify(logLines).includes('t4'));
});

test('another resource type is refused with INVALID_ARGUMENT, not answered', async () => {
  const { call, replies } = openSotw();
  call.write({ resource_names: ['default'], type_url: 'type.googleapis.com/envoy.config.cluster.v3.Cluster' });
  await assert.rejects(replies.next(), (err: grpc.ServiceError) => err.code === grpc.status.INVALID_ARGUMENT);
});

test('FetchSecrets answers the named secrets once', async () => {
  const response = await new Promise<Record<string, any>>((resolve, reject) => {
    client.FetchSecrets({ resource_names: ['reports', 'nope'], type_url: SECRET_TYPE_URL }, (err: Error | null, value: Record<string, any>) => (err ? reject(err) : resolve(value)));
  });
  assert.deepEqual(secrets(response), { reports: 'Bearer r2', nope: '' });
  assert.match(response.version_info, /^\d+$/);
});

test('DeltaSecrets: subscribe, per-resource versions, pushes, initial versions held, unsubscribe', async () => {
  const call = client.DeltaSecrets() as grpc.ClientDuplexStream<object, Record<string, any>>;
  const replies = new Replies(call);
  call.write({ type_url: SECRET_TYPE_URL, resource_names_subscribe: ['default'] });
  const first = await replies.next();
  assert.equal(first.type_url, SECRET_TYPE_URL);
  assert.equal(first.resources.length, 1);
  const [resource] = first.resources;
  assert.equal(resource.name, 'default');
  assert.ok(resource.version);
  assert.deepEqual(decodeSecret(resource.resource), { name: 'default', value: 'Bearer t4', typeUrl: SECRET_TYPE_URL });
  call.write({ type_url: SECRET_TYPE_URL, response_nonce: first.nonce });
  assert.ok(await replies.none());
  tokens.default.set('t5');
  const pushed = await replies.next();
  assert.deepEqual(pushed.resources.map((r: any) => [r.name, decodeSecret(r.resource).value]), [['default', 'Bearer t5']]);
  assert.notEqual(pushed.resources[0].version, resource.version);
  call.write({ type_url: SECRET_TYPE_URL, response_nonce: pushed.nonce, resource_names_unsubscribe: ['default'] });
  assert.ok(await replies.none(100)); // the unsubscription has arrived
  tokens.default.set('t6');
  assert.ok(await replies.none());
  call.end();

  // A reconnecting Envoy names the versions it holds: those are not sent again.
  const again = client.DeltaSecrets() as grpc.ClientDuplexStream<object, Record<string, any>>;
  const againReplies = new Replies(again);
  const current = await new Promise<Record<string, any>>((resolve) => {
    const probe = client.DeltaSecrets() as grpc.ClientDuplexStream<object, Record<string, any>>;
    probe.once('data', (d: Record<string, any>) => { probe.cancel(); resolve(d); });
    probe.on('error', () => {});
    probe.write({ type_url: SECRET_TYPE_URL, resource_names_subscribe: ['default'] });
  });
  again.write({ type_url: SECRET_TYPE_URL, resource_names_subscribe: ['default', 'reports'], initial_resource_versions: { default: current.resources[0].version } });
  const held = await againReplies.next();
  assert.deepEqual(held.resources.map((r: any) => r.name), ['reports']);
  again.end();
});

test('DeltaSecrets NACK: logged once, the rejected version not sent again, the next one is', async () => {
  const call = client.DeltaSecrets() as grpc.ClientDuplexStream<object, Record<string, any>>;
  const replies = new Replies(call);
  call.write({ type_url: SECRET_TYPE_URL, resource_names_subscribe: ['reports'] });
  const first = await replies.next();
  const before = logLines.length;
  const nack = { type_url: SECRET_TYPE_URL, response_nonce: first.nonce, error_detail: { code: 3, message: 'rejected' } };
  call.write(nack);
  call.write(nack);
  assert.ok(await replies.none());
  assert.equal(logLines.slice(before).filter((l) => /SDS NACK/.test(l.msg)).length, 1);
  tokens.reports.set('r9');
  const next = await replies.next();
  assert.deepEqual(next.resources.map((r: any) => decodeSecret(r.resource).value), ['Bearer r9']);
  call.end();
});
