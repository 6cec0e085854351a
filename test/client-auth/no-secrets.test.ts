// Nothing secret in output, for every client-authentication method: the real sidecar at trace
// level, its metrics, check-config and token, and failures. No client secret, assertion, private
// key, identity header or access token may appear, raw or in any usual encoding.
import assert from 'node:assert/strict';
import { createPublicKey, generateKeyPairSync, randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { exportJWK, SignJWT } from 'jose';
import { startAzureIdentityServer, type AzureIdentityServer } from '../helpers/azure-identity-server.ts';
import { ExtProcClient, requestHeaders, setHeaders, TYPICAL_HEADERS } from '../helpers/extproc-client.ts';
import { startOAuthServer, type OAuthServer } from '../helpers/oauth-server.ts';
import { createPki, type Issued, type Pki } from '../helpers/pki.ts';
import { runCli, startSidecar, writeConfig } from '../helpers/sidecar.ts';

let pki: Pki;
let idp: OAuthServer;
let azure: AzureIdentityServer;
let dir: string;
let jwtKey: Issued;
let mtlsKey: Issued;
let tokenFileContent: string;
/** Every projected token written; oidc-provider refuses a replayed jti, so each use gets a fresh one. */
const projected: string[] = [];
let writeProjected: () => Promise<void>;
let config: Record<string, any>;
let env: NodeJS.ProcessEnv;

const PROFILES = ['default', 'basic', 'jwt', 'mtls', 'workload', 'imds', 'appservice'] as const;

before(async () => {
  pki = createPki();
  dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-nosecrets-'));
  jwtKey = pki.client('orders-jwt', 'rsa-pkcs1');
  mtlsKey = pki.client('orders-mtls', 'ec-sec1');
  const cluster = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  idp = await startOAuthServer({
    tls: { key: pki.server.key, cert: pki.server.cert, clientCa: pki.ca.cert },
    mtls: true,
    clients: [
      { client_id: 'orders-jwt', token_endpoint_auth_method: 'private_key_jwt', jwks: { keys: [await exportJWK(createPublicKey(jwtKey.key))] } },
      { client_id: 'orders-mtls', token_endpoint_auth_method: 'tls_client_auth', tls_client_auth_subject_dn: 'CN=orders-mtls' },
      { client_id: 'orders-workload', token_endpoint_auth_method: 'private_key_jwt', jwks: { keys: [await exportJWK(cluster.publicKey)] } },
    ],
  });
  azure = await startAzureIdentityServer();
  writeProjected = async () => {
    const now = Math.floor(Date.now() / 1000);
    tokenFileContent = await new SignJWT({}).setProtectedHeader({ alg: 'ES256' }).setIssuer('orders-workload').setSubject('orders-workload')
      .setAudience(idp.tokenUrl).setJti(randomUUID()).setIssuedAt(now).setExpirationTime(now + 3600).sign(cluster.privateKey);
    projected.push(tokenFileContent);
    writeFileSync(join(dir, 'sa-token'), tokenFileContent);
  };
  await writeProjected();
  writeFileSync(join(dir, 'post-secret'), idp.clients.post.clientSecret);
  writeFileSync(join(dir, 'basic-secret'), idp.clients.basic.clientSecret);

  const https = { tokenUrl: idp.tokenUrl, tls: { ca: `\${file:${pki.ca.certFile}}` } };
  config = {
    logging: { level: 'trace' },
    profiles: {
      default: { ...https, clientId: idp.clients.post.clientId, clientSecret: `\${file:${join(dir, 'post-secret')}}`, scope: 'api://orders/.default' },
      basic: { ...https, clientAuth: 'client_secret_basic', clientId: idp.clients.basic.clientId, clientSecret: `\${file:${join(dir, 'basic-secret')}}` },
      jwt: { ...https, clientAuth: 'private_key_jwt', clientId: 'orders-jwt', privateKey: `\${file:${jwtKey.keyFile}}`, certificate: `\${file:${jwtKey.certFile}}` },
      mtls: { ...https, clientAuth: 'tls_client_auth', clientId: 'orders-mtls', privateKey: `\${file:${mtlsKey.keyFile}}`, certificate: `\${file:${mtlsKey.certFile}}` },
      workload: { ...https, clientAuth: 'workload_identity', clientId: 'orders-workload', tokenFile: join(dir, 'sa-token') },
      imds: { clientAuth: 'managed_identity', identityEndpoint: azure.origin, resource: 'https://vault.azure.net' },
      appservice: { clientAuth: 'managed_identity', resource: 'https://vault.azure.net' },
    },
  };
  env = { IDENTITY_ENDPOINT: azure.appServiceEndpoint, IDENTITY_HEADER: azure.identityHeader };
});

after(async () => {
  await azure.close();
  await idp.close();
  pki.remove();
  rmSync(dir, { recursive: true, force: true });
});

/** A secret and the encodings it could leak in. */
function forms(secret: string): string[] {
  return [
    secret,
    Buffer.from(secret).toString('base64'),
    Buffer.from(secret).toString('base64url'),
    encodeURIComponent(secret),
    JSON.stringify(secret).slice(1, -1),
  ];
}

/** A PEM key leaks if any line of its base64 body does. */
function pemLines(pem: string): string[] {
  return pem.split('\n').filter((l) => l.length >= 40 && !l.startsWith('-----'));
}

/** A JWT leaks whole, or by its signature, or as header.payload (what is signed). */
function jwtForms(jwt: string): string[] {
  const [h, p, s] = jwt.split('.');
  return [...forms(jwt), s!, `${h}.${p}`];
}

function assertClean(where: string, text: string, secrets: Map<string, string>): void {
  for (const [needle, what] of secrets) {
    assert.ok(!text.includes(needle), `${what} appears in ${where}`);
  }
}

test('no secret, assertion, key or token in logs at trace, metrics, check-config, token output or errors, for every method', async () => {
  const sidecar = await startSidecar({ config, env });
  const outputs: Array<[string, string]> = [];
  const tokens: string[] = [];
  try {
    const client = new ExtProcClient(sidecar.grpcAddress);
    for (const profile of PROFILES) {
      const { reply } = await client.exchange(requestHeaders(TYPICAL_HEADERS), { profile });
      const authorization = setHeaders(reply).authorization;
      assert.match(authorization ?? '', /^Bearer ey/, `profile ${profile} injected a token`);
      tokens.push(authorization!.slice('Bearer '.length));
    }
    client.close();
    outputs.push(['metrics', await (await fetch(`${sidecar.adminUrl}/metrics`)).text()]);
  } finally {
    assert.equal(await sidecar.stop(), 0);
  }
  outputs.push(['sidecar logs', [...sidecar.stdout, ...sidecar.stderr].join('\n')]);
  assert.ok(sidecar.logs().some((r) => r.level === 'trace' || r.level === 'debug'), 'ran at trace level');

  const file = writeConfig(config, dir);
  const check = await runCli(['check-config', '--config', file], env);
  assert.equal(check.code, 0, check.stderr);
  outputs.push(['check-config', check.stdout + check.stderr]);
  for (const profile of PROFILES) {
    if (profile === 'workload') await writeProjected();
    const out = await runCli(['token', '--config', file, '--profile', profile], env);
    assert.equal(out.code, 0, `${profile}: ${out.stderr}`);
    outputs.push([`token --profile ${profile}`, out.stdout + out.stderr]);
  }

  // Failures: an endpoint that echoes what it was sent, and a key the server does not know.
  idp.override(
    { status: 400, headers: { 'content-type': 'application/json' }, body: JSON.stringify({ error: 'invalid_client', error_description: `bad secret ${idp.clients.post.clientSecret}` }) },
    { status: 400, headers: { 'content-type': 'application/json' }, body: JSON.stringify({ error: 'invalid_client', error_description: `bad assertion ${tokenFileContent}` }) },
    { status: 502, headers: { 'content-type': 'text/html' }, body: `<html>${tokenFileContent}</html>` },
  );
  for (const profile of ['default', 'workload', 'workload'] as const) {
    const out = await runCli(['token', '--config', file, '--profile', profile], env);
    assert.equal(out.code, 1, `${profile} failed`);
    outputs.push([`failing token --profile ${profile}`, out.stdout + out.stderr]);
  }
  writeFileSync(join(dir, 'sa-token'), '');
  const empty = await runCli(['token', '--config', file, '--profile', 'workload'], env);
  // Caught at start, by path (at fetch time it is OAUTH2_ERR_SECRET: workload-identity.test.ts).
  assert.match(empty.stderr, /profiles\.workload\.tokenFile: .*sa-token is empty/);
  outputs.push(['empty token file', empty.stdout + empty.stderr]);

  // Everything the sidecar and the CLI sent or received that is secret.
  const secrets = new Map<string, string>();
  const add = (values: string[], what: string): void => void values.forEach((v) => secrets.set(v, what));
  add(forms(idp.clients.post.clientSecret), 'the post client secret');
  add(forms(idp.clients.basic.clientSecret), 'the basic client secret');
  for (const r of idp.tokenRequests) if (r.authorization !== undefined) add([r.authorization.slice('Basic '.length)], 'the Basic credentials');
  add(pemLines(jwtKey.key), 'the private_key_jwt key');
  add(pemLines(mtlsKey.key), 'the tls_client_auth key');
  add(forms(azure.identityHeader), 'IDENTITY_HEADER');
  for (const t of projected) add(jwtForms(t), 'a projected token');
  const assertions = idp.tokenRequests.map((r) => r.form.get('client_assertion')).filter((a): a is string => a !== null);
  assert.ok(assertions.length >= 4, 'assertions were sent');
  for (const a of assertions) add(jwtForms(a), 'a client assertion');
  for (const t of [...tokens, ...azure.issued]) add(jwtForms(t), 'an access token');

  for (const [where, text] of outputs) assertClean(where, text, secrets);

  // And the output does say what it may: the method, the assertion's claims, the thumbprints.
  const jwtOut = outputs.find(([w]) => w === 'token --profile jwt')![1];
  assert.match(jwtOut, /client authentication: private_key_jwt/);
  assert.match(jwtOut, /assertion header: \{"alg":"RS256","typ":"JWT","x5t#S256":"[\w-]{43}","x5t":"[\w-]{27}"\}/);
  assert.match(jwtOut, /"iss": "orders-jwt"/);
  assert.match(jwtOut, /certificate thumbprints: x5t#S256=/);
  assert.match(outputs.find(([w]) => w === 'token --profile mtls')![1], /client authentication: tls_client_auth\ncertificate: CN=orders-mtls/);
  assert.match(outputs.find(([w]) => w === 'token --profile appservice')![1], /endpoint: App Service identity endpoint http:\/\/127\.0\.0\.1:\d+\/msi\/token/);
});

// The whole request, value by value and longest first (so that what an endpoint keeps of a long
// echo starts with the credential), in one of the encodings an endpoint might echo it in: each
// failing fetch gets the next one. These are the encodings src/token-response.ts masks.
const ECHO_VIEWS: ReadonlyArray<(value: string) => string> = [
  (s) => s,
  (s) => new URLSearchParams([['', s]]).toString().slice(1),
  (s) => new URLSearchParams([['', s]]).toString().slice(1).replace(/\+/g, '%20'),
  (s) => encodeURIComponent(s),
  (s) => encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`),
  (s) => Buffer.from(s).toString('base64'),
  (s) => Buffer.from(s).toString('base64').replace(/=+$/, ''),
  (s) => Buffer.from(s).toString('base64url'),
  (s) => JSON.stringify(s).slice(1, -1),
  (s) => JSON.stringify(s).slice(1, -1).replace(/\//g, '\\/'),
  (s) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`),
  (s) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;'),
];

/** Every encoding above of a secret, whole and as the 100 characters a truncated echo starts with. */
function everyEncoding(secret: string): string[] {
  return ECHO_VIEWS.map((view) => view(secret)).flatMap((e) => [e, e.slice(0, 100)]);
}

interface EchoServer {
  url: string;
  /** What each request carried: its form values and header values. */
  seen: Map<string, string[][]>;
  close(): Promise<void>;
}

/** Answers every request with 400 and the whole request echoed in error_description (ECHO_VIEWS, in turn per path). */
async function startEcho(tls?: { key: string; cert: string }): Promise<EchoServer> {
  const seen = new Map<string, string[][]>();
  const handler = (req: IncomingMessage, res: ServerResponse): void => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const path = new URL(req.url ?? '/', 'http://x').pathname;
      const body = Buffer.concat(chunks).toString('utf8');
      const values = [...new URLSearchParams(body).values(), ...Object.values(req.headers).flat().filter((v): v is string => typeof v === 'string'), req.url ?? ''];
      values.sort((a, b) => b.length - a.length);
      const requests = seen.get(path) ?? [];
      requests.push(values);
      seen.set(path, requests);
      const view = ECHO_VIEWS[(requests.length - 1) % ECHO_VIEWS.length]!;
      res.writeHead(400, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: 'invalid_request', error_description: values.map(view).join(' ') }));
    });
  };
  const server = tls === undefined
    ? createHttpServer(handler)
    : createHttpsServer({ ...tls, requestCert: true, rejectUnauthorized: false }, handler);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const host = tls === undefined ? '127.0.0.1' : new URL(idp.tokenUrl).hostname;
  return {
    url: `${tls === undefined ? 'http' : 'https'}://${host}:${(server.address() as AddressInfo).port}`,
    seen,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

test('failing fetches whose endpoint echoes the whole request: the running sidecar at trace level logs no assertion, key or identity header, in any encoding', async () => {
  const tlsEcho = await startEcho({ key: pki.server.key, cert: pki.server.cert });
  const msiEcho = await startEcho();
  const identityHeader = `idh-${randomUUID()}`;
  const fast = { minBackoffSeconds: 0.05, maxBackoffSeconds: 0.1, jitter: 0 };
  const ca = { ca: `\${file:${pki.ca.certFile}}` };
  const echoing = {
    logging: { level: 'trace' },
    profiles: {
      jwt: {
        ...config.profiles.jwt, tokenUrl: `${tlsEcho.url}/jwt/token`, tls: ca, refresh: fast,
        assertion: { audience: idp.tokenUrl },
      },
      mtls: { ...config.profiles.mtls, tokenUrl: `${tlsEcho.url}/mtls/token`, tls: ca, refresh: fast },
      appservice: { ...config.profiles.appservice, refresh: fast },
    },
  };
  const sidecar = await startSidecar({
    config: echoing, env: { IDENTITY_ENDPOINT: `${msiEcho.url}/msi/token`, IDENTITY_HEADER: identityHeader }, waitReady: false,
  });
  const failures = (profile: string): Array<Record<string, any>> =>
    sidecar.logs().filter((r) => r.msg === 'token fetch failed' && r.profile === profile);
  try {
    // Every profile failed once per encoding at least.
    for (const profile of ['jwt', 'mtls', 'appservice']) {
      for (let n = 0; failures(profile).length < ECHO_VIEWS.length; n++) {
        assert.ok(n < 300, `profile ${profile} failed ${failures(profile).length} times`);
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
    // And a request per profile meanwhile: denied, and logged at debug with the failure's code.
    const client = new ExtProcClient(sidecar.grpcAddress);
    for (const profile of ['jwt', 'mtls', 'appservice']) {
      const { reply } = await client.exchange(requestHeaders(TYPICAL_HEADERS), { profile });
      assert.equal(reply.immediate_response?.status.code, 'ServiceUnavailable', `profile ${profile} denied`);
    }
    client.close();
  } finally {
    assert.equal(await sidecar.stop(), 0);
    await tlsEcho.close();
    await msiEcho.close();
  }
  const output = [...sidecar.stdout, ...sidecar.stderr].join('\n');
  assert.ok(sidecar.logs().some((r) => r.level === 'trace' || r.level === 'debug'), 'ran at trace level');

  const secrets = new Map<string, string>();
  const add = (values: string[], what: string): void => void values.forEach((v) => secrets.set(v, what));
  const assertions = (tlsEcho.seen.get('/jwt/token') ?? []).map((values) => values[0]!);
  assert.ok(assertions.length >= ECHO_VIEWS.length && assertions.every((a) => a.split('.').length === 3), 'the assertions were echoed');
  for (const a of assertions) {
    add(everyEncoding(a), 'a client assertion');
    add(everyEncoding(a.split('.')[2]!), 'a client assertion\'s signature');
  }
  add(everyEncoding(identityHeader), 'IDENTITY_HEADER');
  assert.ok((msiEcho.seen.get('/msi/token') ?? []).every((values) => values.includes(identityHeader)), 'the identity header was sent');
  add(pemLines(jwtKey.key), 'the private_key_jwt key');
  add(pemLines(mtlsKey.key), 'the tls_client_auth key');
  assertClean('the sidecar\'s log output', output, secrets);

  // The echo came back, and its credential part was masked.
  for (const profile of ['jwt', 'appservice']) {
    const described = failures(profile).map((r) => r.oauthErrorDescription as string);
    assert.ok(described.length >= ECHO_VIEWS.length && described.every((d) => d.includes('[redacted]')), `${profile}: ${described[0]}`);
  }
  assert.equal(failures('mtls')[0]!.code, 'OAUTH2_ERR_TOKEN_STATUS');
});
