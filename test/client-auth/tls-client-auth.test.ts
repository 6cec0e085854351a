// tls_client_auth (RFC 8705 §2) against oidc-provider with its mTLS features: the client
// certificate on the TLS connection, certificate-bound tokens, rotation without a restart, and
// the same through a CONNECT proxy.
import assert from 'node:assert/strict';
import { createHash, X509Certificate } from 'node:crypto';
import { copyFileSync, rmSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { parseConfig, type ProfileConfig } from '../../src/config.ts';
import { TokenEndpointError } from '../../src/errors.ts';
import { withSource } from '../helpers/client-auth.ts';
import { configProblems } from '../helpers/config.ts';
import { startConnectProxy, type ConnectProxy } from '../helpers/connect-proxy.ts';
import { startOAuthServer, type OAuthServer } from '../helpers/oauth-server.ts';
import { createPki, type Issued, type Pki } from '../helpers/pki.ts';

let pki: Pki;
let server: OAuthServer;
let proxy: ConnectProxy;
let first: Issued;
let rotated: Issued;
let stranger: Issued;

before(async () => {
  pki = createPki();
  first = pki.client('mtls-1', 'ec-sec1', 'orders-mtls');
  rotated = pki.client('mtls-2', 'rsa-pkcs1', 'orders-mtls');
  stranger = pki.client('mtls-3', 'rsa-pkcs8', 'someone-else');
  server = await startOAuthServer({
    tls: { key: pki.server.key, cert: pki.server.cert, clientCa: pki.ca.cert },
    mtls: true,
    clients: [{
      client_id: 'orders-mtls',
      token_endpoint_auth_method: 'tls_client_auth',
      tls_client_auth_subject_dn: 'CN=orders-mtls',
      tls_client_certificate_bound_access_tokens: true,
    }],
  });
  proxy = await startConnectProxy();
});

after(async () => {
  await proxy.close();
  await server.close();
  pki.remove();
});

function profile(certFile: string, keyFile: string, env: NodeJS.ProcessEnv = {}): ProfileConfig {
  return parseConfig(`
profiles:
  default:
    clientAuth: tls_client_auth
    tokenUrl: ${server.tokenUrl}
    clientId: orders-mtls
    certificate: \${file:${certFile}}
    privateKey: \${file:${keyFile}}
    tls:
      ca: \${file:${pki.ca.certFile}}
`, { env, baseDir: pki.dir }).profiles.default!;
}

const s256 = (pem: string): string => createHash('sha256').update(new X509Certificate(pem).raw).digest('base64url');

describe('tls_client_auth against oidc-provider (features.mTLS)', () => {
  test('the certificate goes on the connection, client_id in the form, and the token is bound to that certificate', async () => {
    await withSource(profile(first.certFile, first.keyFile), async (source) => {
      const token = await source.fetch();
      const request = server.tokenRequests.at(-1)!;
      assert.equal(request.clientCertificate, 'CN=orders-mtls');
      assert.deepEqual([...request.form.keys()].sort(), ['client_id', 'grant_type']);
      assert.equal(request.authorization, undefined);
      const claims = await server.verify(token.accessToken);
      // RFC 8705 §3.1: the token carries the certificate's SHA-256 thumbprint.
      assert.deepEqual(claims.cnf, { 'x5t#S256': s256(first.cert) });
    });
  });

  test('a certificate rotated on disk is presented on the next fetch, without a restart', async () => {
    const { certFile, keyFile } = pki.copy(first, 'live-mtls');
    await withSource(profile(certFile, keyFile), async (source) => {
      assert.deepEqual((await server.verify((await source.fetch()).accessToken)).cnf, { 'x5t#S256': s256(first.cert) });
      pki.copy(rotated, 'live-mtls');
      assert.deepEqual((await server.verify((await source.fetch()).accessToken)).cnf, { 'x5t#S256': s256(rotated.cert) });
    });
  });

  test('a pair rotated out of step is OAUTH2_ERR_CLIENT_AUTH; a missing file is OAUTH2_ERR_SECRET naming its path', async () => {
    const { certFile, keyFile } = pki.copy(first, 'step-mtls');
    await withSource(profile(certFile, keyFile), async (source) => {
      copyFileSync(rotated.certFile, certFile);
      await assert.rejects(source.fetch(), {
        name: 'ClientAuthError',
        code: 'OAUTH2_ERR_CLIENT_AUTH',
        message: `the private key of profile default (file ${keyFile}) does not match the certificate of profile default (file ${certFile})`,
      });
      rmSync(keyFile);
      await assert.rejects(source.fetch(), {
        name: 'SecretReadError', code: 'OAUTH2_ERR_SECRET', message: `cannot read the private key of profile default (file ${keyFile}: ENOENT)`,
      });
    });
  });

  test('a certificate whose subject is not the registered one is refused by the server: invalid_client', async () => {
    await withSource(profile(stranger.certFile, stranger.keyFile), async (source) => {
      await assert.rejects(source.fetch(), (err) => {
        assert.ok(err instanceof TokenEndpointError);
        assert.equal(err.status, 401);
        assert.equal(err.oauthError, 'invalid_client');
        return true;
      });
    });
  });

  test('through an HTTPS_PROXY the client certificate still reaches the server, inside the tunnel', async () => {
    const before = proxy.tunnels.length;
    await withSource(profile(first.certFile, first.keyFile, { HTTPS_PROXY: proxy.url }), async (source) => {
      const claims = await server.verify((await source.fetch()).accessToken);
      assert.deepEqual(claims.cnf, { 'x5t#S256': s256(first.cert) });
      assert.deepEqual(proxy.tunnels.slice(before), [new URL(server.tokenUrl).host]);
    });
  });

  test('the validator: both files required, a mismatched pair and an http tokenUrl refused at start', () => {
    const problems = (text: string): string[] => configProblems(text, { env: {}, baseDir: pki.dir });
    assert.deepEqual(problems(`
profiles:
  default:
    clientAuth: tls_client_auth
    tokenUrl: http://127.0.0.1:1/token
    clientId: orders-mtls
    clientSecret: x
    certificate: \${file:${first.certFile}}
`), [
      'profiles.default.clientSecret: not used with clientAuth tls_client_auth',
      'profiles.default.privateKey: required with clientAuth tls_client_auth',
      'profiles.default.tokenUrl: tls_client_auth needs an https tokenUrl',
    ]);
    assert.deepEqual(problems(`
profiles:
  default:
    clientAuth: tls_client_auth
    tokenUrl: ${server.tokenUrl}
    clientId: orders-mtls
    certificate: \${file:${first.certFile}}
    privateKey: \${file:${rotated.keyFile}}
`), ['profiles.default.certificate: does not match privateKey (the certificate is for CN=orders-mtls)']);
  });
});
