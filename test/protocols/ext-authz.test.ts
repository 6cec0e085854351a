// The ext_authz Check handler, served by a real grpc-js server and asked by a client built from
// the upstream Envoy protos, with CheckRequests shaped as Envoy 1.40 sends them.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { parseConfig } from '../../src/config.ts';
import { createLogger } from '../../src/logger.ts';
import { Metrics } from '../../src/metrics.ts';
import { authzService, ExtAuthzService } from '../../src/protocols/ext-authz.ts';
import type { Token } from '../../src/token.ts';
import { upstreamClient } from '../helpers/xds-client.ts';

const config = parseConfig(`
profiles:
  default: { tokenUrl: 'https://idp.test/token', clientId: a, clientSecret: b, removeHeaders: [x-api-key] }
  reports: { tokenUrl: 'https://idp.test/token', clientId: a, clientSecret: b, failureStatus: 401 }
  lenient: { tokenUrl: 'https://idp.test/token', clientId: a, clientSecret: b, onFailure: allow }
`, { env: {} });

const tokens: Record<string, Token | undefined> = {};
const token = (accessToken: string): Token => ({ accessToken, tokenType: 'Bearer', obtainedAt: 0, expiresAt: 1, refreshInSeconds: undefined });
const logLines: Array<Record<string, any>> = [];
const logger = createLogger('debug', { write: (line: string) => void logLines.push(JSON.parse(line)) });
const metrics = new Metrics({ defaultMetrics: false });
const service = new ExtAuthzService({
  profiles: Object.values(config.profiles).map((p) => ({ config: p, tokens: { current: () => tokens[p.name] } })),
  logger,
  metrics,
});

let server: grpc.Server;
let client: grpc.Client & Record<string, any>;

before(async () => {
  server = new grpc.Server();
  server.addService(authzService, service.handlers);
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
  });
  client = upstreamClient('envoy/service/auth/v3/external_auth.proto', 'envoy.service.auth.v3.Authorization', `127.0.0.1:${port}`);
});

after(() => {
  client.close();
  server.forceShutdown();
});

function check(path: string, headers: Record<string, string>, profile?: string): Promise<Record<string, any>> {
  const request = {
    attributes: {
      source: { address: { socket_address: { address: '10.0.0.1', port_value: 41000 } } },
      request: { time: { seconds: '1' }, http: { id: '1', method: 'GET', headers: { ':path': path, ':method': 'GET', ...headers }, path, host: 'api', protocol: 'HTTP/1.1' } },
      context_extensions: profile === undefined ? {} : { 'x-oauth2-profile': profile },
    },
  };
  return new Promise((resolve, reject) => client.Check(request, (err: Error | null, res: Record<string, any>) => (err ? reject(err) : resolve(res))));
}

const header = (key: string, value: string) => ({ header: { key, value }, append: { value: false } });

test('allowed: the token header set with append false, the key and extras removed', async () => {
  tokens.default = token('t1');
  const res = await check('/orders/42?expand=lines', { authorization: 'Bearer forged', 'ocp-apim-subscription-key': 'k' });
  assert.deepEqual(res, {
    status: { code: 0 },
    http_response: 'ok_response',
    ok_response: {
      headers: [header('authorization', 'Bearer t1')],
      headers_to_remove: ['ocp-apim-subscription-key', 'x-api-key'],
    },
  });
});

test('the query parameters the request carries are listed by each raw spelling; others stay', async () => {
  const res = await check('/o?a=1&subscription-key=k&Subscription-Key=k2&subscription%2Dkey=k3&subscription.key=k4&b=2', {});
  assert.deepEqual(res.ok_response.query_parameters_to_remove, ['subscription-key', 'Subscription-Key', 'subscription%2Dkey']);
  // A `;`-separated piece takes its `&` segment: Envoy splits at `&` only.
  const semi = await check('/o?a=1;subscription-key=k&b=2', {});
  assert.deepEqual(semi.ok_response.query_parameters_to_remove, ['a']);
  const none = await check('/o?a=1&b=2', {});
  assert.equal(none.ok_response.query_parameters_to_remove, undefined);
});

test('other spellings of removed headers the request carries are removed too', async () => {
  const res = await check('/o', { 'ocp_apim_subscription_key': 'k', 'x_api-key': 'k' });
  assert.deepEqual(res.ok_response.headers_to_remove, ['ocp-apim-subscription-key', 'x-api-key', 'ocp_apim_subscription_key', 'x_api-key']);
});

test('the profile comes from the x-oauth2-profile context extension', async () => {
  tokens.reports = token('r1');
  const res = await check('/reports/1', {}, 'reports');
  assert.deepEqual(res.ok_response.headers, [header('authorization', 'Bearer r1')]);
});

test('no token: denied with the profile\'s status and ext_proc\'s JSON body', async () => {
  tokens.reports = undefined;
  const res = await check('/reports/1', { 'ocp-apim-subscription-key': 'k' }, 'reports');
  assert.deepEqual(res, {
    status: { code: grpc.status.UNAVAILABLE, message: 'oauth2_extproc_oauth2_err_no_token' },
    http_response: 'denied_response',
    denied_response: {
      status: { code: 'Unauthorized' },
      headers: [header('content-type', 'application/json'), header('cache-control', 'no-store')],
      body: JSON.stringify({ error: 'OAUTH2_ERR_NO_TOKEN', message: 'no usable access token for this profile', profile: 'reports' }),
    },
  });
});

test('onFailure: allow without a token: allowed, the caller\'s authorization removed, the key too', async () => {
  const res = await check('/x?subscription-key=k', { authorization: 'Bearer forged' }, 'lenient');
  assert.deepEqual(res.ok_response, {
    headers_to_remove: ['ocp-apim-subscription-key', 'authorization'],
    query_parameters_to_remove: ['subscription-key'],
  });
});

test('an unknown profile: denied with 500 and the unknown-profile body, logged once', async () => {
  const before = logLines.length;
  for (let i = 0; i < 2; i++) {
    const res = await check('/x', {}, 'nope');
    assert.equal(res.status.code, grpc.status.FAILED_PRECONDITION);
    assert.equal(res.denied_response.status.code, 'InternalServerError');
    assert.deepEqual(JSON.parse(res.denied_response.body), { error: 'OAUTH2_ERR_UNKNOWN_PROFILE', message: 'the stream names a profile that is not configured', profile: 'nope' });
  }
  assert.equal(logLines.slice(before).filter((l) => l.profile === 'nope').length, 1);
});

test('every check is counted in oauth2_extproc_requests_total by profile and outcome', async () => {
  const count = async (profile: string, outcome: string): Promise<number> => {
    const text = await metrics.registry.getSingleMetricAsString('oauth2_extproc_requests_total');
    const m = new RegExp(`^oauth2_extproc_requests_total\\{profile="${profile}",outcome="${outcome}"\\} (\\d+)$`, 'm').exec(text);
    return m === null ? 0 : Number(m[1]);
  };
  const before = { injected: await count('default', 'injected'), denied: await count('reports', 'denied'), allowed: await count('lenient', 'allowed_without_token'), unknown: await count('nope', 'unknown_profile') };
  tokens.default = token('t-count');
  tokens.reports = undefined;
  tokens.lenient = undefined;
  await check('/a', {});
  await check('/a', {}, 'reports');
  await check('/a', {}, 'lenient');
  await check('/a', {}, 'nope');
  assert.equal(await count('default', 'injected'), before.injected + 1);
  assert.equal(await count('reports', 'denied'), before.denied + 1);
  assert.equal(await count('lenient', 'allowed_without_token'), before.allowed + 1);
  assert.equal(await count('nope', 'unknown_profile'), before.unknown + 1);
});
