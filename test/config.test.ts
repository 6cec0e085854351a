import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { loadConfig, parseConfig } from '../src/config.ts';
import { describeConfig } from '../src/config-summary.ts';
import { ConfigError } from '../src/errors.ts';
import { configProblems } from './helpers/config.ts';

const dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-config-'));
const secretFile = join(dir, 'client-secret');
writeFileSync(secretFile, 's3cr3t-from-file\n');

/** The example of DESIGN.md, as written there. */
const DESIGN_EXAMPLE = `
server:
  grpc: 127.0.0.1:9001          # ext_proc listener: host:port, or unix:/path/to.sock
  admin: 127.0.0.1:9002         # HTTP: /healthz, /readyz, /metrics
logging:
  level: info
profiles:
  default:                      # serves every stream that names no other profile
    tokenUrl: https://login.microsoftonline.com/\${TENANT_ID}/oauth2/v2.0/token
    clientId: \${CLIENT_ID}
    clientSecret: \${file:${secretFile}}
    scope: api://orders/.default
`;
const env = { TENANT_ID: 'contoso-tenant', CLIENT_ID: 'orders-client' };

function problems(text: string, environment: NodeJS.ProcessEnv = env): string[] {
  return configProblems(text, { env: environment, baseDir: dir });
}

test('the DESIGN.md example works as written, with every default filled in', () => {
  const config = parseConfig(DESIGN_EXAMPLE, { env, baseDir: dir });
  const p = config.profiles.default!;
  assert.deepEqual(
    { ...p, clientId: p.clientId.read(), clientSecret: p.clientSecret.read() },
    {
      name: 'default',
      tokenUrl: 'https://login.microsoftonline.com/contoso-tenant/oauth2/v2.0/token',
      clientId: 'orders-client',
      clientSecret: 's3cr3t-from-file',
      clientAuth: 'client_secret_post',
      scope: 'api://orders/.default',
      resource: undefined,
      audience: undefined,
      extraParams: {},
      timeoutMs: 20_000,
      maxTokenBytes: 16_384,
      header: 'authorization',
      removeHeaders: ['ocp-apim-subscription-key'],
      removeQueryParameters: ['subscription-key'],
      onFailure: 'deny',
      failureStatus: 503,
      refresh: { share: 0.5, jitter: 0.05, marginSeconds: 30, minBackoffSeconds: 1, maxBackoffSeconds: 60, onBackendStatus: [] },
    },
  );
  assert.deepEqual(config.server, { grpc: '127.0.0.1:9001', admin: '127.0.0.1:9002', shutdownGraceSeconds: 10, workers: 1, streamIdleSeconds: 60 });
  assert.equal(config.logging.level, 'info');
  assert.ok(Object.isFrozen(config.profiles.default));
});

test('a ${file:} secret is read again at each use, so a rotated Secret is picked up', () => {
  const file = join(dir, 'rotating');
  writeFileSync(file, 'first\n');
  const config = parseConfig(`profiles: { default: { tokenUrl: 'https://idp.test/token', clientId: id, clientSecret: '\${file:rotating}' } }`, { env: {}, baseDir: dir });
  assert.equal(config.profiles.default!.clientSecret.read(), 'first');
  writeFileSync(file, 'second');
  assert.equal(config.profiles.default!.clientSecret.read(), 'second');
});

test('every problem is reported at once, by its path', () => {
  const found = problems(`
server:
  grpc: localhost
  admn: 127.0.0.1:9002
logging:
  level: loud
profiles:
  default:
    tokenUrl: ftp://idp.test/token
    clientId: \${MISSING_ID}
    clientAuth: client_secret_jwt
    removeHeaders: [host, "bad header"]
    onFailure: open
    failureStatus: 418
    timeoutSeconds: -1
    refresh: { share: 2, minBackoffSeconds: 10, maxBackoffSeconds: 5 }
    extraParams: { grant_type: password }
  second:
    tokenUrl: https://idp.test/token
    clientId: x
    clientSecret: \${file:/nonexistent/secret}
    scpoe: api://x/.default
`);
  assert.deepEqual(found, [
    'server.admn: unknown key (did you mean "admin"?)',
    'server.grpc: must be host:port or unix:/path/to.sock',
    'logging.level: must be one of trace, debug, info, warn, error, fatal, silent',
    // clientAuth first: which keys a profile needs depends on it.
    'profiles.default.clientAuth: must be one of client_secret_post, client_secret_basic, private_key_jwt, tls_client_auth, workload_identity, managed_identity',
    'profiles.default.clientSecret: required',
    'profiles.default.clientId: environment variable MISSING_ID is not set',
    'profiles.default.tokenUrl: must be an absolute http(s) URL',
    'profiles.default.extraParams.grant_type: "grant_type" is set by the sidecar; use the profile\'s own key for it',
    'profiles.default.removeHeaders[0]: Envoy never lets a processor remove pseudo-headers or host',
    'profiles.default.removeHeaders[1]: is not a valid HTTP header name',
    'profiles.default.onFailure: must be one of deny, allow',
    'profiles.default.failureStatus: must be one of 401, 403, 429, 500, 502, 503, 504',
    'profiles.default.refresh.share: must be at most 0.95',
    'profiles.default.refresh.maxBackoffSeconds: must not be smaller than minBackoffSeconds',
    'profiles.default.timeoutSeconds: must be at least 0.1',
    'profiles.second.scpoe: unknown key (did you mean "scope"?)',
    'profiles.second.clientSecret: cannot read file /nonexistent/secret (ENOENT)',
  ]);
});

test('a typo at the top level names the key', () => {
  assert.deepEqual(problems('profile:\n  default: {}\n'), [
    'profile: unknown key (did you mean "profiles"?)',
    'profiles: required: at least one profile',
  ]);
});

test('YAML syntax errors and non-mapping documents are reported, not thrown', () => {
  assert.match(problems('profiles: [unclosed\n')[0]!, /^line \d+, column \d+: YAML: Flow sequence/);
  assert.deepEqual(problems('- a\n- b\n'), ['(root): must be a mapping', 'profiles: required: at least one profile']);
  assert.deepEqual(problems(''), ['profiles: required: at least one profile']);
});

test('empty and malformed values are named', () => {
  assert.deepEqual(problems(`profiles:\n  default:\n    tokenUrl: ""\n    clientId: [a]\n    clientSecret: "\${}"\n`), [
    'profiles.default.tokenUrl: required (it is empty)',
    'profiles.default.clientId: must be a string',
    'profiles.default.clientSecret: ${} is neither ${NAME} (environment) nor ${file:PATH}',
  ]);
});

test('a custom token header still keeps the caller\'s Authorization away from the backend', () => {
  const config = parseConfig(`profiles: { default: { tokenUrl: 'https://idp.test/t', clientId: a, clientSecret: b, header: X-Backend-Token, subscriptionKeyHeader: X-Api-Key, removeHeaders: [X-Debug] } }`, { env: {} });
  const p = config.profiles.default!;
  assert.equal(p.header, 'x-backend-token');
  assert.deepEqual(p.removeHeaders, ['x-api-key', 'authorization', 'x-debug']);
});

test('Entra v1 (resource), a generic IdP (audience, Basic auth, extra parameters) and unix sockets parse', () => {
  const config = parseConfig(`
server: { grpc: unix:/var/run/extproc/extproc.sock, admin: "0.0.0.0:9902" }
profiles:
  default:
    tokenUrl: https://login.microsoftonline.com/t/oauth2/token
    clientId: a
    clientSecret: b
    resource: https://orders.contoso.com
  auth0:
    tokenUrl: https://tenant.auth0.test/oauth/token
    clientId: c
    clientSecret: d
    clientAuth: client_secret_basic
    audience: https://api.example.test
    extraParams: { organization: org_123, max_age: 60 }
    onFailure: allow
`, { env: {} });
  assert.equal(config.server.grpc, 'unix:/var/run/extproc/extproc.sock');
  assert.equal(config.profiles.default!.resource, 'https://orders.contoso.com');
  assert.deepEqual(config.profiles.auth0!.extraParams, { organization: 'org_123', max_age: '60' });
  assert.equal(config.profiles.auth0!.clientAuth, 'client_secret_basic');
});

test('loadConfig names an unreadable file; describeConfig never prints the secret', () => {
  assert.throws(() => loadConfig(join(dir, 'nope.yaml')), (err: ConfigError) => err.problems[0]!.message === 'cannot read the config file (ENOENT)');
  const file = join(dir, 'config.yaml');
  writeFileSync(file, DESIGN_EXAMPLE);
  const summary = describeConfig(loadConfig(file, { env }));
  assert.ok(!summary.includes('s3cr3t'), summary);
  assert.match(summary, /clientSecret: \(set, 16 characters\)/);
  assert.match(summary, /remove: ocp-apim-subscription-key/);
});

test('server.workers: a whole number from 1 to 64, or auto (one per core, capped the same way), also from ${VAR}', () => {
  const workers = (value: string, env: NodeJS.ProcessEnv = {}) => parseConfig(`server: { workers: ${value} }\nprofiles: { default: { tokenUrl: 'https://idp.test/t', clientId: a, clientSecret: b } }`, { env }).server.workers;
  assert.equal(workers('auto'), Math.min(availableParallelism(), 64));
  assert.equal(workers('"${W}"', { W: 'auto' }), Math.min(availableParallelism(), 64));
  assert.equal(workers('"${W}"', { W: '3' }), 3);
  assert.equal(workers('2'), 2);
  const bad = (value: string, env: NodeJS.ProcessEnv = {}) => problems(`server: { workers: ${value} }\nprofiles: { default: { tokenUrl: 'https://idp.test/t', clientId: a, clientSecret: b } }`, env);
  assert.deepEqual(bad('0'), ['server.workers: must be at least 1']);
  assert.deepEqual(bad('65'), ['server.workers: must be at most 64']);
  assert.deepEqual(bad('1.5'), ['server.workers: must be a whole number']);
  assert.deepEqual(bad('many'), ['server.workers: must be a whole number from 1 to 64, or auto']);
  assert.deepEqual(bad('"${W}"', { W: 'all' }), ['server.workers: must be a whole number from 1 to 64, or auto']);
  assert.deepEqual(bad('"${NOPE}"'), ['server.workers: environment variable NOPE is not set']);
});

test('maxTokenBytes is a whole number of bytes from 256 to 1 MiB', () => {
  const p = (value: string) => `profiles: { default: { tokenUrl: 'https://idp.test/t', clientId: a, clientSecret: b, maxTokenBytes: ${value} } }`;
  assert.equal(parseConfig(p('65536'), { env: {} }).profiles.default!.maxTokenBytes, 65_536);
  assert.deepEqual(problems(p('100')), ['profiles.default.maxTokenBytes: must be at least 256']);
  assert.deepEqual(problems(p('big')), ['profiles.default.maxTokenBytes: must be a number']);
});

test('clientAuth decides which keys a profile needs: the secret methods keep "required", the rest say why, and unused keys are errors', () => {
  const base = "tokenUrl: 'https://idp.test/t', clientId: a";
  assert.deepEqual(problems(`profiles: { default: { ${base}, clientSecret: b, privateKey: c, tokenFile: /t, identityEndpoint: 'http://x' } }`), [
    'profiles.default.privateKey: not used with clientAuth client_secret_post',
    'profiles.default.tokenFile: not used with clientAuth client_secret_post',
    'profiles.default.identityEndpoint: not used with clientAuth client_secret_post',
  ]);
  assert.deepEqual(problems(`profiles: { default: { ${base}, clientAuth: client_secret_basic } }`), ['profiles.default.clientSecret: required']);
  assert.deepEqual(problems(`profiles: { default: { clientAuth: tls_client_auth, clientId: a } }`), [
    'profiles.default.tokenUrl: required with clientAuth tls_client_auth',
    'profiles.default.privateKey: required with clientAuth tls_client_auth',
    'profiles.default.certificate: required with clientAuth tls_client_auth',
  ]);
  assert.deepEqual(problems(`profiles: { default: { clientAuth: managed_identity, resource: r, audience: x, extraParams: { a: b } } }`), [
    'profiles.default.audience: not used with clientAuth managed_identity',
    'profiles.default.extraParams: not used with clientAuth managed_identity',
  ]);
});

test('the proxy comes from the environment (lower case first) for token endpoints, never for managed identity', () => {
  const profile = (text: string, env: NodeJS.ProcessEnv) => parseConfig(text, { env }).profiles.default!;
  const post = "profiles: { default: { tokenUrl: 'https://idp.test/t', clientId: a, clientSecret: '${S}' } }";
  assert.equal(profile(post, { S: 's' }).proxy, undefined);
  assert.deepEqual(profile(post, { S: 's', HTTPS_PROXY: 'http://upper:3128', https_proxy: 'http://lower:3128', NO_PROXY: '.corp' }).proxy, {
    httpsProxy: 'http://lower:3128', httpProxy: undefined, noProxy: '.corp',
  });
  assert.equal(profile('profiles: { default: { clientAuth: managed_identity, resource: r } }', { HTTPS_PROXY: 'http://p:3128', HTTP_PROXY: 'http://p:3128' }).proxy, undefined);
});
