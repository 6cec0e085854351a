// TokenSource against a real OAuth2 server (oidc-provider on 127.0.0.1), and against the bad
// answers a token endpoint or whatever sits in front of it can give.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { inspect } from 'node:util';
import { Agent } from 'undici';
import { parseConfig, type ProfileConfig } from '../src/config.ts';
import {
  SecretReadError,
  TokenEndpointError,
  TokenFetchError,
  TokenNetworkError,
  TokenResponseError,
  TokenTimeoutError,
} from '../src/errors.ts';
import { TokenSource } from '../src/token-source.ts';
import { fixed, testProfile } from './helpers/config.ts';
import { FakeClock } from './helpers/fake-clock.ts';
import { SCOPES, startOAuthServer, type OAuthServer, type TestClient } from './helpers/oauth-server.ts';

let server: OAuthServer;
let dispatcher: Agent;

before(async () => {
  server = await startOAuthServer({ ttlSeconds: 300 });
  dispatcher = new Agent();
});

after(async () => {
  await dispatcher.close();
  await server.close();
});

function profile(client: TestClient, overrides: Partial<ProfileConfig> = {}): ProfileConfig {
  return testProfile({
    tokenUrl: server.tokenUrl,
    clientId: fixed(client.clientId),
    clientSecret: fixed(client.clientSecret),
    clientAuth: client.authMethod,
    timeoutMs: 5000,
    ...overrides,
  });
}

function source(p: ProfileConfig, clock = new FakeClock()): TokenSource {
  return new TokenSource(p, { dispatcher, clock });
}

/** Fetches expecting a failure of `type`; checks that nothing secret leaked into it. */
async function fetchError<T extends TokenFetchError>(s: TokenSource, type: new (...args: any[]) => T, client: TestClient = server.clients.post): Promise<T> {
  const err = await s.fetch().then(
    () => assert.fail('expected the fetch to fail'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof type, `expected ${type.name}, got ${inspect(err)}`);
  assertNoSecret(err, client);
  return err;
}

function assertNoSecret(err: unknown, client: TestClient): void {
  const basic = Buffer.from(`${encodeURIComponent(client.clientId)}:${encodeURIComponent(client.clientSecret)}`).toString('base64');
  const texts = [String((err as Error).message), JSON.stringify(err), inspect(err, { depth: Infinity, showHidden: true })];
  for (const text of texts) {
    assert.ok(!text.includes(client.clientSecret), `secret leaked: ${text}`);
    assert.ok(!text.includes(encodeURIComponent(client.clientSecret)), `encoded secret leaked: ${text}`);
    assert.ok(!text.includes(basic.slice(0, 16)), `authorization header leaked: ${text}`);
  }
}

function answer(status: number, body: unknown, headers: Record<string, string> = { 'content-type': 'application/json' }): { status: number; headers: Record<string, string>; body: string } {
  return { status, headers, body: typeof body === 'string' ? body : JSON.stringify(body) };
}

/** An unsigned JWT-shaped token: enough for the `exp` fallback, which does not verify. */
function fakeJwt(claims: Record<string, unknown>): string {
  const part = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${part({ alg: 'none', typ: 'JWT' })}.${part(claims)}.sig`;
}

describe('a token from the real server', () => {
  test('client_secret_post sends id and secret in the form', async () => {
    const clock = new FakeClock(Date.now());
    const before = server.tokenRequests.length;
    const token = await source(profile(server.clients.post), clock).fetch();

    assert.equal(token.tokenType, 'Bearer');
    assert.equal(token.obtainedAt, clock.now());
    assert.equal(token.expiresAt, clock.now() + 300_000);
    assert.equal(token.refreshInSeconds, undefined);
    const claims = await server.verify(token.accessToken);
    assert.equal(claims.client_id, 'orders-post');

    assert.equal(server.tokenRequests.length, before + 1);
    const sent = server.tokenRequests.at(-1)!;
    assert.equal(sent.authorization, undefined);
    assert.deepEqual(Object.fromEntries(sent.form), {
      grant_type: 'client_credentials',
      client_id: 'orders-post',
      client_secret: 'post-secret-Zx9!',
    });
  });

  test('client_secret_basic form-encodes id and secret before base64 (RFC 6749 §2.3.1)', async () => {
    const client = server.clients.basic;
    assert.match(client.clientId, /:/, 'the test client must have a colon in its id');
    const token = await source(profile(client)).fetch();

    const claims = await server.verify(token.accessToken);
    assert.equal(claims.client_id, 'orders:basic');
    const sent = server.tokenRequests.at(-1)!;
    assert.deepEqual(Object.fromEntries(sent.form), { grant_type: 'client_credentials' });
    // 'orders:basic' / 'basic s3cret+/=%:&' encoded as application/x-www-form-urlencoded.
    assert.equal(sent.authorization, `Basic ${Buffer.from('orders%3Abasic:basic+s3cret%2B%2F%3D%25%3A%26').toString('base64')}`);
  });

  test('scope, resource, audience and extra parameters are sent', async () => {
    const p = profile(server.clients.post, {
      scope: 'api://orders/.default',
      resource: 'https://orders.test',
      audience: 'orders-api',
      extraParams: { tenant_hint: 'contoso', 'x-extra': 'a b&c' },
    });
    const token = await source(p).fetch();

    const claims = await server.verify(token.accessToken, 'https://orders.test');
    assert.equal(claims.aud, 'https://orders.test');
    assert.equal(claims.scope, 'api://orders/.default');
    const sent = server.tokenRequests.at(-1)!;
    assert.deepEqual(Object.fromEntries(sent.form), {
      grant_type: 'client_credentials',
      scope: 'api://orders/.default',
      resource: 'https://orders.test',
      audience: 'orders-api',
      tenant_hint: 'contoso',
      'x-extra': 'a b&c',
      client_id: 'orders-post',
      client_secret: 'post-secret-Zx9!',
    });
    assert.ok(SCOPES.includes('api://orders/.default'));
  });

  test('a ${file:} secret is read again at every fetch', async (t) => {
    const dir = mkdtempSync(join(tmpdir(), 'token-source-'));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const file = join(dir, 'client-secret');
    writeFileSync(file, 'post-secret-Zx9!\n');
    const config = parseConfig([
      'profiles:',
      '  default:',
      `    tokenUrl: ${server.tokenUrl}`,
      '    clientId: orders-post',
      '    clientSecret: ${file:client-secret}',
    ].join('\n'), { env: {}, baseDir: dir });
    const s = source(config.profiles.default!);

    await s.fetch();
    assert.equal(server.tokenRequests.at(-1)!.form.get('client_secret'), 'post-secret-Zx9!');

    // Rotated to a secret the server does not know: the next fetch sends it, and is refused.
    writeFileSync(file, 'rotated-secret\n');
    const refused = await fetchError(s, TokenEndpointError, { ...server.clients.post, clientSecret: 'rotated-secret' });
    assert.equal(server.tokenRequests.at(-1)!.form.get('client_secret'), 'rotated-secret');
    assert.equal(refused.status, 401);
    assert.equal(refused.oauthError, 'invalid_client');

    writeFileSync(file, 'post-secret-Zx9!');
    await s.fetch();

    rmSync(file);
    const unreadable = await fetchError(s, SecretReadError);
    assert.equal(unreadable.code, 'OAUTH2_ERR_SECRET');
    assert.equal(unreadable.message, `cannot read the client secret of profile default (file ${file}: ENOENT)`);
  });

  test('an empty secret is not sent', async () => {
    const before = server.tokenRequests.length;
    const err = await fetchError(source(profile(server.clients.post, { clientSecret: { read: () => '' } })), SecretReadError);
    assert.equal(err.message, 'the client secret of profile default is empty');
    assert.equal(server.tokenRequests.length, before);
  });
});

describe('no answer', () => {
  test('a refused connection is a network error', async () => {
    const closed = createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const { port } = closed.address() as { port: number };
    await new Promise<void>((resolve) => closed.close(() => resolve()));

    const err = await fetchError(source(profile(server.clients.post, { tokenUrl: `http://127.0.0.1:${port}/token?tenant=x` })), TokenNetworkError);
    assert.equal(err.code, 'OAUTH2_ERR_TOKEN_NETWORK');
    assert.equal(err.message, `cannot reach the token endpoint http://127.0.0.1:${port} (ECONNREFUSED)`);
    assert.equal(err.retryAfterSeconds, undefined);
  });

  test('an endpoint that never answers times out', async () => {
    server.override('hang');
    const err = await fetchError(source(profile(server.clients.basic, { timeoutMs: 200 })), TokenTimeoutError, server.clients.basic);
    assert.equal(err.code, 'OAUTH2_ERR_TOKEN_TIMEOUT');
    assert.equal(err.message, 'token endpoint did not answer within 200 ms');
  });

  test('a body that stops half-way times out too', async (t) => {
    // Headers and the start of a body, then nothing: the timeout covers the whole exchange.
    const { createServer: createHttpServer } = await import('node:http');
    const stalled = createHttpServer((_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.write('{"access_token":');
    });
    await new Promise<void>((resolve) => stalled.listen(0, '127.0.0.1', resolve));
    t.after(() => {
      stalled.closeAllConnections();
      stalled.close();
    });
    const { port } = stalled.address() as { port: number };
    const err = await fetchError(source(profile(server.clients.post, { tokenUrl: `http://127.0.0.1:${port}/token`, timeoutMs: 200 })), TokenTimeoutError);
    assert.equal(err.message, 'token endpoint did not answer within 200 ms');
  });
});

describe('an error status', () => {
  test('400 with an OAuth2 error body', async () => {
    server.override(answer(400, { error: 'invalid_client', error_description: 'client authentication failed' }));
    const err = await fetchError(source(profile(server.clients.post)), TokenEndpointError);
    assert.equal(err.code, 'OAUTH2_ERR_TOKEN_STATUS');
    assert.equal(err.status, 400);
    assert.equal(err.oauthError, 'invalid_client');
    assert.equal(err.oauthErrorDescription, 'client authentication failed');
    assert.equal(err.retryAfterSeconds, undefined);
    assert.equal(err.message, 'token endpoint answered HTTP 400 (error=invalid_client: client authentication failed)');
  });

  test('the real server refusing a wrong secret', async () => {
    const client = { ...server.clients.basic, clientSecret: 'not the secret' };
    const err = await fetchError(source(profile(client)), TokenEndpointError, client);
    assert.equal(err.status, 401);
    assert.equal(err.oauthError, 'invalid_client');
    assert.equal(err.oauthErrorDescription, 'client authentication failed');
  });

  test('401 with no body', async () => {
    server.override({ status: 401, body: '' });
    const err = await fetchError(source(profile(server.clients.post)), TokenEndpointError);
    assert.equal(err.status, 401);
    assert.equal(err.oauthError, undefined);
    assert.equal(err.oauthErrorDescription, undefined);
    assert.equal(err.message, 'token endpoint answered HTTP 401 (no OAuth2 error body; no content-type, empty body)');
  });

  test('500 with an HTML page: its type and size, never its text', async () => {
    const page = `<html>\r\n<head><title>500 Internal Server Error</title></head>\n<body>${'x'.repeat(5000)}</body></html>`;
    server.override(answer(500, page, { 'content-type': 'text/html; charset=utf-8' }));
    const err = await fetchError(source(profile(server.clients.post)), TokenEndpointError);
    assert.equal(err.status, 500);
    assert.equal(err.oauthError, undefined);
    assert.equal(
      err.message,
      `token endpoint answered HTTP 500 (no OAuth2 error body; text/html; charset=utf-8, ${Buffer.byteLength(page)} bytes)`,
    );
  });

  test('an endpoint echoing the secret back does not put it in the error', async () => {
    const client = server.clients.post;
    server.override(
      answer(502, `bad gateway for client_secret=${encodeURIComponent(client.clientSecret)}`, { 'content-type': 'text/plain' }),
      answer(400, { error: 'invalid_request', error_description: `unexpected secret ${client.clientSecret}` }),
    );
    const s = source(profile(client));
    const first = await fetchError(s, TokenEndpointError);
    assert.equal(first.message, 'token endpoint answered HTTP 502 (no OAuth2 error body; text/plain, 46 bytes)');
    const second = await fetchError(s, TokenEndpointError);
    assert.equal(second.oauthErrorDescription, 'unexpected secret [redacted]');
  });

  test('503 with Retry-After in seconds', async () => {
    server.override(answer(503, 'busy', { 'retry-after': '120', 'content-type': 'text/plain' }));
    const err = await fetchError(source(profile(server.clients.post)), TokenEndpointError);
    assert.equal(err.status, 503);
    assert.equal(err.retryAfterSeconds, 120);
    assert.equal(err.message, 'token endpoint answered HTTP 503 (no OAuth2 error body; text/plain, 4 bytes)');
  });

  test('503 with Retry-After as an HTTP-date, read against the clock', async () => {
    const clock = new FakeClock();
    server.override(
      answer(503, '', { 'retry-after': new Date(clock.now() + 90_000).toUTCString() }),
      answer(503, '', { 'retry-after': new Date(clock.now() - 90_000).toUTCString() }),
      answer(503, '', { 'retry-after': 'soon' }),
    );
    const s = source(profile(server.clients.post), clock);
    assert.equal((await fetchError(s, TokenEndpointError)).retryAfterSeconds, 90);
    assert.equal((await fetchError(s, TokenEndpointError)).retryAfterSeconds, 0);
    assert.equal((await fetchError(s, TokenEndpointError)).retryAfterSeconds, undefined);
  });

  test('429 with an OAuth2 body and Retry-After', async () => {
    server.override(answer(429, { error: 'temporarily_unavailable', error_description: 'slow down' }, { 'content-type': 'application/json', 'retry-after': '7' }));
    const err = await fetchError(source(profile(server.clients.post)), TokenEndpointError);
    assert.equal(err.status, 429);
    assert.equal(err.retryAfterSeconds, 7);
    assert.equal(err.oauthError, 'temporarily_unavailable');
    assert.equal(err.oauthErrorDescription, 'slow down');
  });

  test('Retry-After on other statuses is not a throttle', async () => {
    server.override(answer(500, { error: 'server_error' }, { 'content-type': 'application/json', 'retry-after': '30' }));
    const err = await fetchError(source(profile(server.clients.post)), TokenEndpointError);
    assert.equal(err.retryAfterSeconds, undefined);
    assert.equal(err.message, 'token endpoint answered HTTP 500 (error=server_error)');
  });

  test('a redirect is not followed', async () => {
    const before = server.tokenRequests.length;
    server.override(answer(302, '', { location: `${server.issuer}/elsewhere` }));
    const err = await fetchError(source(profile(server.clients.post)), TokenEndpointError);
    assert.equal(err.status, 302);
    assert.equal(server.tokenRequests.length, before + 1);
  });
});

describe('a 2xx that is not a usable token response', () => {
  const cases: Array<[string, { status?: number; body: string; headers?: Record<string, string> }, string]> = [
    ['not JSON', { body: '<html>ok</html>', headers: { 'content-type': 'text/html' } }, 'token response is not JSON (HTTP 200, text/html)'],
    ['form-encoded, as some IdPs do (never quoted: it holds a token)', { body: 'access_token=tok&token_type=bearer', headers: { 'content-type': 'application/x-www-form-urlencoded' } }, 'token response is not JSON (HTTP 200, application/x-www-form-urlencoded)'],
    ['empty', { status: 204, body: '', headers: {} }, 'token response is not JSON (HTTP 204, no content-type)'],
    ['a JSON array', { body: '[{"access_token":"a"}]' }, 'token response is not a JSON object (HTTP 200, application/json)'],
    ['a JSON string', { body: '"token"' }, 'token response is not a JSON object (HTTP 200, application/json)'],
    ['an OAuth2 error', { body: '{"error":"invalid_scope","error_description":"AADSTS70011: bad scope"}' }, 'token response carries an OAuth2 error (error=invalid_scope: AADSTS70011: bad scope)'],
    ['no access_token', { body: '{"token_type":"Bearer","expires_in":3600}' }, 'token response has no access_token'],
    ['an empty access_token', { body: '{"access_token":"","expires_in":3600}' }, 'token response has no access_token'],
    ['a numeric access_token', { body: '{"access_token":12345,"expires_in":3600}' }, 'token response has no access_token'],
    ['an access_token with a newline', { body: '{"access_token":"abc\\r\\nx-injected: 1","expires_in":3600}' }, 'access_token contains characters that cannot go into a header (space, control or non-ASCII)'],
    ['an access_token with a space', { body: '{"access_token":"abc def","expires_in":3600}' }, 'access_token contains characters that cannot go into a header (space, control or non-ASCII)'],
    ['an access_token with NUL', { body: '{"access_token":"abc\\u0000","expires_in":3600}' }, 'access_token contains characters that cannot go into a header (space, control or non-ASCII)'],
    ['a token_type with a space', { body: '{"access_token":"abc","token_type":"Bearer x","expires_in":3600}' }, 'token_type is not a valid HTTP token'],
    ['a token_type that is a number', { body: '{"access_token":"abc","token_type":1,"expires_in":3600}' }, 'token_type is not a valid HTTP token'],
    ['no expires_in and not a JWT', { body: '{"access_token":"opaque","token_type":"Bearer"}' }, 'token response has no expires_in and the access token is not a JWT with exp'],
    ['expires_in -5', { body: '{"access_token":"abc","expires_in":-5}' }, 'expires_in is not a positive number of seconds'],
    ['expires_in 0', { body: '{"access_token":"abc","expires_in":0}' }, 'expires_in is not a positive number of seconds'],
    ['expires_in "abc"', { body: '{"access_token":"abc","expires_in":"abc"}' }, 'expires_in is not a positive number of seconds'],
    ['expires_in ""', { body: '{"access_token":"abc","expires_in":""}' }, 'expires_in is not a positive number of seconds'],
    ['expires_in true', { body: '{"access_token":"abc","expires_in":true}' }, 'expires_in is not a positive number of seconds'],
    ['expires_in 1e400 (Infinity once parsed)', { body: '{"access_token":"abc","expires_in":1e400}' }, 'expires_in is not a positive number of seconds'],
    ['expires_in -1e300', { body: '{"access_token":"abc","expires_in":-1e300}' }, 'expires_in is not a positive number of seconds'],
    ['expires_in "NaN"', { body: '{"access_token":"abc","expires_in":"NaN"}' }, 'expires_in is not a positive number of seconds'],
    ['expires_in "Infinity"', { body: '{"access_token":"abc","expires_in":"Infinity"}' }, 'expires_in is not a positive number of seconds'],
    ['expires_in "1e13"', { body: '{"access_token":"abc","expires_in":"1e13"}' }, 'expires_in is not a positive number of seconds'],
  ];
  for (const [name, a, message] of cases) {
    test(name, async () => {
      server.override({ status: a.status ?? 200, headers: a.headers ?? { 'content-type': 'application/json' }, body: a.body });
      const err = await fetchError(source(profile(server.clients.post)), TokenResponseError);
      assert.equal(err.code, 'OAUTH2_ERR_TOKEN_RESPONSE');
      assert.equal(err.message, message);
      assert.ok(!err.message.includes('tok&'), 'a 2xx body is never quoted');
    });
  }

  test('an OAuth2 error in a 200 keeps error and error_description', async () => {
    server.override(answer(200, { error: 'invalid_scope', error_description: 'bad scope' }));
    const err = await fetchError(source(profile(server.clients.post)), TokenResponseError);
    assert.equal(err.oauthError, 'invalid_scope');
    assert.equal(err.oauthErrorDescription, 'bad scope');
  });

  test('no expires_in and a JWT already expired', async () => {
    const clock = new FakeClock();
    server.override(answer(200, { access_token: fakeJwt({ exp: clock.now() / 1000 - 1 }) }));
    const err = await fetchError(source(profile(server.clients.post), clock), TokenResponseError);
    assert.equal(err.message, 'token response has no expires_in and the JWT exp is already past');
  });

  test('a body over 1 MiB is not read whole', async () => {
    server.override(answer(200, { access_token: 'a'.repeat(2 * 1024 * 1024), expires_in: 60 }));
    const err = await fetchError(source(profile(server.clients.post)), TokenResponseError);
    assert.equal(err.message, 'token response larger than 1048576 bytes (HTTP 200, application/json)');
  });
});

describe('what a valid token response may look like', () => {
  test('Entra v1: expires_in and refresh_in as strings, lower-case bearer', async () => {
    const clock = new FakeClock();
    server.override(answer(200, { access_token: 'eyJ.abc-_~+/=', token_type: 'bearer', expires_in: '3599', ext_expires_in: '3599', refresh_in: '1799', resource: 'https://orders.test' }));
    const token = await source(profile(server.clients.post), clock).fetch();
    assert.deepEqual(token, {
      accessToken: 'eyJ.abc-_~+/=',
      tokenType: 'Bearer',
      obtainedAt: clock.now(),
      expiresAt: clock.now() + 3_599_000,
      refreshInSeconds: 1799,
    });
  });

  test('no token_type means Bearer; other types are kept as sent', async () => {
    server.override(
      answer(200, { access_token: 'a1', expires_in: 60 }),
      answer(200, { access_token: 'a2', expires_in: 60, token_type: 'BEARER' }),
      answer(200, { access_token: 'a3', expires_in: 60, token_type: 'DPoP' }),
      answer(200, { access_token: 'a4', expires_in: 60, token_type: 'N_A' }),
    );
    const s = source(profile(server.clients.post));
    const types = [];
    for (let i = 0; i < 4; i++) types.push((await s.fetch()).tokenType);
    assert.deepEqual(types, ['Bearer', 'Bearer', 'DPoP', 'N_A']);
  });

  test('no expires_in: the JWT exp gives the lifetime', async () => {
    const clock = new FakeClock();
    const jwt = fakeJwt({ sub: 'x', exp: clock.now() / 1000 + 600 });
    server.override(answer(200, { access_token: jwt, token_type: 'Bearer' }));
    const token = await source(profile(server.clients.post), clock).fetch();
    assert.equal(token.expiresAt, clock.now() + 600_000);
  });

  test('an absurd expires_in (1e13, 1e300, 20 digits) is read as a year; a refresh_in past the end is ignored', async () => {
    const clock = new FakeClock();
    server.override(
      answer(200, { access_token: 'a', expires_in: 1e13 }),
      answer(200, { access_token: 'a', expires_in: 1e300, refresh_in: 1e300 }),
      answer(200, { access_token: 'a', expires_in: '99999999999999999999', refresh_in: '99999999999999999999' }),
      answer(200, { access_token: fakeJwt({ exp: 1e300 }) }),
    );
    const s = source(profile(server.clients.post), clock);
    for (let i = 0; i < 4; i++) {
      const token = await s.fetch();
      assert.equal(token.expiresAt, clock.now() + 365 * 24 * 3600 * 1000);
      assert.equal(token.refreshInSeconds, undefined);
      assert.equal(new Date(token.expiresAt).toISOString(), '2031-01-01T12:00:00.000Z');
    }
  });

  test('a bad refresh_in is ignored, not fatal', async () => {
    server.override(answer(200, { access_token: 'a', expires_in: 60, refresh_in: 'later' }), answer(200, { access_token: 'a', expires_in: 60, refresh_in: 0 }));
    const s = source(profile(server.clients.post));
    assert.equal((await s.fetch()).refreshInSeconds, undefined);
    assert.equal((await s.fetch()).refreshInSeconds, undefined);
  });

  test('the default dispatcher works when none is injected', async () => {
    const token = await new TokenSource(profile(server.clients.post)).fetch();
    await server.verify(token.accessToken);
  });
});
