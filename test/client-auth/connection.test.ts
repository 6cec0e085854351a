// What every method that talks to a tokenUrl shares: tls.ca on top of the system CAs, the
// HTTPS_PROXY / HTTP_PROXY / NO_PROXY proxy, and the warnings check-config and the sidecar give.
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parse } from 'yaml';
import { after, before, describe, test } from 'node:test';
import { parseConfig } from '../../src/config.ts';
import { describeConfig } from '../../src/config-summary.ts';
import { TokenNetworkError } from '../../src/errors.ts';
import { TokenSource } from '../../src/token-source.ts';
import { withSource } from '../helpers/client-auth.ts';
import { startConnectProxy, type ConnectProxy } from '../helpers/connect-proxy.ts';
import { startOAuthServer, type OAuthServer } from '../helpers/oauth-server.ts';
import { createPki, type Pki } from '../helpers/pki.ts';
import { runCli, startSidecar } from '../helpers/sidecar.ts';

let pki: Pki;
let https: OAuthServer;
let http: OAuthServer;
let proxy: ConnectProxy;

before(async () => {
  pki = createPki();
  https = await startOAuthServer({ tls: { key: pki.server.key, cert: pki.server.cert } });
  http = await startOAuthServer();
  proxy = await startConnectProxy();
  writeFileSync(join(pki.dir, 'secret'), https.clients.post.clientSecret);
});

after(async () => {
  await proxy.close();
  await http.close();
  await https.close();
  pki.remove();
});

const postProfile = (server: OAuthServer, extra = ''): string => `
profiles:
  default:
    tokenUrl: ${server.tokenUrl}
    clientId: ${server.clients.post.clientId}
    clientSecret: \${file:secret}
${extra.replace(/^/gm, '    ')}
`;

describe('tls.ca', () => {
  test('a private CA for client_secret_post: trusted with tls.ca, refused without', async () => {
    await withSource(parseConfig(postProfile(https, `tls:\n  ca: \${file:${pki.ca.certFile}}`), { env: {}, baseDir: pki.dir }).profiles.default!, async (trusted) => {
      await https.verify((await trusted.fetch()).accessToken);
    });
    const untrusted = new TokenSource(parseConfig(postProfile(https), { env: {}, baseDir: pki.dir }).profiles.default!);
    await assert.rejects(untrusted.fetch(), TokenNetworkError);
  });

  test('another CA in tls.ca does not make the server trusted; a file with no certificate is a config error', async () => {
    const other = pki.otherCa();
    await withSource(parseConfig(postProfile(https, `tls:\n  ca: \${file:${other.certFile}}`), { env: {}, baseDir: pki.dir }).profiles.default!, async (source) => {
      await assert.rejects(source.fetch(), TokenNetworkError);
    });
    writeFileSync(join(pki.dir, 'empty-ca.pem'), 'nothing here\n');
    assert.throws(() => parseConfig(postProfile(https, 'tls:\n  ca: ${file:empty-ca.pem}'), { env: {}, baseDir: pki.dir }), {
      message: 'profiles.default.tls.ca: holds no PEM certificate (-----BEGIN CERTIFICATE-----)',
    });
  });
});

describe('proxy', () => {
  test('HTTP_PROXY carries a plain http token request in absolute form, with the proxy\'s own credentials', async () => {
    const withCredentials = proxy.url.replace('http://', 'http://squid-user:squid-pass@');
    const p = parseConfig(postProfile(http), { env: { HTTP_PROXY: withCredentials }, baseDir: pki.dir }).profiles.default!;
    writeFileSync(join(pki.dir, 'secret'), http.clients.post.clientSecret);
    const before = proxy.forwarded.length;
    const source = new TokenSource(p);
    try {
      await http.verify((await source.fetch()).accessToken);
    } finally {
      await source.close();
      writeFileSync(join(pki.dir, 'secret'), https.clients.post.clientSecret);
    }
    assert.deepEqual(proxy.forwarded.slice(before), [http.tokenUrl]);
    assert.equal(proxy.proxyAuthorizations.at(-1), `Basic ${Buffer.from('squid-user:squid-pass').toString('base64')}`);
    // check-config names the proxy without its credentials.
    assert.match(describeConfig(parseConfig(postProfile(http), { env: { http_proxy: withCredentials }, baseDir: pki.dir })), /\n {2}proxy: http:\/\/\*\*\*@127\.0\.0\.1:\d+\n/);
  });

  test('HTTPS_PROXY does not apply to an http tokenUrl, and nothing is proxied without the variables', async () => {
    writeFileSync(join(pki.dir, 'secret'), http.clients.post.clientSecret);
    try {
      const before = [proxy.forwarded.length, proxy.tunnels.length];
      for (const environment of [{ HTTPS_PROXY: proxy.url }, {}]) {
        const source = new TokenSource(parseConfig(postProfile(http), { env: environment, baseDir: pki.dir }).profiles.default!);
        await source.fetch();
        await source.close();
      }
      assert.deepEqual([proxy.forwarded.length, proxy.tunnels.length], before);
    } finally {
      writeFileSync(join(pki.dir, 'secret'), https.clients.post.clientSecret);
    }
  });
});

describe('warnings', () => {
  const text = `
server:
  grpc: 0.0.0.0:9001
profiles:
  default:
    tokenUrl: http://idp.internal.example/token
    clientId: orders
    clientSecret: written-in-the-file
  local:
    tokenUrl: http://127.0.0.1:8080/token
    clientId: orders
    clientSecret: \${SECRET}
`;
  const expected = [
    'profiles.default.clientSecret: a secret written into the config file; use ${file:PATH} (a mounted Secret) or ${VAR}',
    'profiles.default.tokenUrl: plain http to idp.internal.example: the client credentials and the token cross the network unencrypted',
    'server.grpc: listens on 0.0.0.0:9001 without TLS: anyone who reaches it gets the tokens injected; bind 127.0.0.1 or a unix socket next to Envoy, or restrict who can reach it (a NetworkPolicy, a compose network)',
  ];

  test('a literal secret, plain http to a remote host and a gRPC port open beyond loopback are warned about, by path', () => {
    const config = parseConfig(text, { env: { SECRET: 's' } });
    assert.deepEqual(config.warnings.map((w) => `${w.path}: ${w.message}`), expected);
    assert.deepEqual(parseConfig(postProfile(http), { env: {}, baseDir: pki.dir }).warnings, []);
  });

  test('check-config prints them and still exits 0; the sidecar logs them at start', async () => {
    const file = join(pki.dir, 'warned.yaml');
    writeFileSync(file, text.replace('0.0.0.0:9001', '127.0.0.1:0'));
    const check = await runCli(['check-config', '--config', file], { SECRET: 's' });
    assert.equal(check.code, 0);
    assert.match(check.stdout, new RegExp(`\\nwarnings \\(2\\):\\n  ${escape(expected[0]!)}\\n  ${escape(expected[1]!)}\\n$`));

    const sidecar = await startSidecar({
      config: { profiles: { default: { tokenUrl: http.tokenUrl, clientId: http.clients.post.clientId, clientSecret: http.clients.post.clientSecret } } },
    });
    try {
      const warned = sidecar.logs().filter((r) => r.level === 'warn' && r.path !== undefined);
      assert.deepEqual(warned.map((r) => [r.path, r.msg]), [
        ['profiles.default.clientSecret', 'config: a secret written into the config file; use ${file:PATH} (a mounted Secret) or ${VAR}'],
      ]);
    } finally {
      assert.equal(await sidecar.stop(), 0);
    }
  });
});

function escape(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

describe('the warnings the shipped configs expect', () => {
  const DEPLOY = new URL('../../deploy/', import.meta.url);
  /** The shipped file, its secret files pointed at one that exists here. */
  function shipped(path: string): { text: string; warnings: string[] } {
    const text = readFileSync(new URL(path, DEPLOY), 'utf8');
    const secret = join(pki.dir, 'shipped-secret');
    writeFileSync(secret, 'not-a-real-secret');
    const yaml = path.startsWith('istio/') ? parse(text.split('\n---\n')[0]!).data['config.yaml'] as string : text;
    const config = parseConfig(yaml.replace(/\$\{file:[^}]+\}/g, `\${file:${secret}}`), { env: { TENANT_ID: 'tenant' } });
    return { text, warnings: config.warnings.map((w) => `${w.path}: ${w.message}`) };
  }

  test('compose: server.grpc on 0.0.0.0 and plain http to idp:8080 (twice), each explained in the file', () => {
    const { text, warnings } = shipped('compose/oauth2-extproc.yaml');
    assert.deepEqual(warnings, [
      'profiles.default.tokenUrl: plain http to idp:8080: the client credentials and the token cross the network unencrypted',
      'profiles.reports.tokenUrl: plain http to idp:8080: the client credentials and the token cross the network unencrypted',
      'server.grpc: listens on 0.0.0.0:9001 without TLS: anyone who reaches it gets the tokens injected; bind 127.0.0.1 or a unix socket next to Envoy, or restrict who can reach it (a NetworkPolicy, a compose network)',
    ]);
    assert.match(text, /Expected at every start of this stack[\s\S]*three config warnings[\s\S]*server\.grpc on 0\.0\.0\.0[\s\S]*Plain http to idp:8080, once per\n# profile/);
  });

  test('istio: only server.grpc on 0.0.0.0, explained in the file', () => {
    const { text, warnings } = shipped('istio/oauth2-extproc.yaml');
    assert.equal(warnings.length, 1);
    assert.match(warnings[0]!, /^server\.grpc: listens on 0\.0\.0\.0:9001 without TLS: .*or restrict who can reach it/);
    assert.match(text, /Expected: the start logs \(and check-config lists\) the server\.grpc warning/);
  });
});
