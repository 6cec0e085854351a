// private_key_jwt against a real OAuth2 server (oidc-provider over HTTPS with a CA this test
// makes), with the key forms people have, rotation on disk, and a proxy in between.
import assert from 'node:assert/strict';
import { createHash, createPublicKey, X509Certificate } from 'node:crypto';
import { copyFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { decodeProtectedHeader, exportJWK, jwtVerify, type JWK } from 'jose';
import { parseConfig, type ProfileConfig } from '../../src/config.ts';
import { ConfigError, TokenEndpointError, TokenNetworkError } from '../../src/errors.ts';
import { withSource } from '../helpers/client-auth.ts';
import { configProblems } from '../helpers/config.ts';
import { startConnectProxy, type ConnectProxy } from '../helpers/connect-proxy.ts';
import { startOAuthServer, type OAuthServer } from '../helpers/oauth-server.ts';
import { createPki, type Issued, type Pki } from '../helpers/pki.ts';

let pki: Pki;
let server: OAuthServer;
let proxy: ConnectProxy;
const keys: Record<string, Issued> = {};

async function jwk(issued: Issued, kid: string): Promise<JWK> {
  return { ...(await exportJWK(createPublicKey(issued.key))), kid };
}

before(async () => {
  pki = createPki();
  keys.rsa8 = pki.client('rsa8', 'rsa-pkcs8');
  keys.rsa1 = pki.client('rsa1', 'rsa-pkcs1');
  keys.ec1 = pki.client('ec1', 'ec-sec1');
  keys.next = pki.client('next', 'rsa-pkcs8');
  server = await startOAuthServer({
    tls: { key: pki.server.key, cert: pki.server.cert },
    clients: [{
      client_id: 'orders-jwt',
      token_endpoint_auth_method: 'private_key_jwt',
      // Both the current and the next key: rotation on disk must not break a running sidecar.
      jwks: { keys: [await jwk(keys.rsa8!, 'rsa8'), await jwk(keys.rsa1!, 'rsa1'), await jwk(keys.ec1!, 'ec1'), await jwk(keys.next!, 'next')] },
    }],
  });
  proxy = await startConnectProxy();
});

after(async () => {
  await proxy.close();
  await server.close();
  pki.remove();
});

/** The config file of a private_key_jwt profile for orders-jwt, with `extra` in the profile (no tls.ca). */
function configText(extra: string): string {
  return `
profiles:
  default:
    clientAuth: private_key_jwt
    tokenUrl: ${server.tokenUrl}
    clientId: orders-jwt
${extra.replace(/^/gm, '    ')}
`;
}

/** That profile with `extra`, trusting the test CA. */
function config(extra: string, env: NodeJS.ProcessEnv = {}): ProfileConfig {
  return parseConfig(configText(`tls:\n  ca: \${file:${pki.ca.certFile}}\n${extra}`), { env, baseDir: pki.dir }).profiles.default!;
}

function lastAssertion(): string {
  const form = server.tokenRequests.at(-1)!.form;
  assert.equal(form.get('client_assertion_type'), 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer');
  assert.equal(form.get('client_id'), 'orders-jwt');
  assert.equal(form.get('client_secret'), null);
  return form.get('client_assertion')!;
}

function thumbprints(pem: string): { s256: string; s1: string } {
  const raw = new X509Certificate(pem).raw;
  return { s256: createHash('sha256').update(raw).digest('base64url'), s1: createHash('sha1').update(raw).digest('base64url') };
}

describe('private_key_jwt against oidc-provider over HTTPS', () => {
  test('an RSA PKCS#8 key with its certificate: RFC 7523 claims, x5t#S256 and x5t, and a token the server signed', async () => {
    await withSource(config(`privateKey: \${file:${keys.rsa8!.keyFile}}\ncertificate: \${file:${keys.rsa8!.certFile}}\nkeyId: rsa8`), async (source) => {
      const token = await source.fetch();
      const claims = await server.verify(token.accessToken);
      assert.equal(claims.client_id, 'orders-jwt');

      const assertion = lastAssertion();
      const { payload, protectedHeader } = await jwtVerify(assertion, createPublicKey(keys.rsa8!.key));
      const t = thumbprints(keys.rsa8!.cert);
      assert.deepEqual(protectedHeader, { alg: 'RS256', typ: 'JWT', kid: 'rsa8', 'x5t#S256': t.s256, x5t: t.s1 });
      assert.deepEqual(Object.keys(payload).sort(), ['aud', 'exp', 'iat', 'iss', 'jti', 'nbf', 'sub']);
      assert.equal(payload.iss, 'orders-jwt');
      assert.equal(payload.sub, 'orders-jwt');
      assert.equal(payload.aud, server.tokenUrl);
      assert.equal(payload.nbf, payload.iat);
      assert.equal(payload.exp, payload.iat! + 300);
      assert.match(String(payload.jti), /^[0-9a-f-]{36}$/);
    });
  });

  test('every fetch signs a new assertion with a fresh jti', async () => {
    await withSource(config(`privateKey: \${file:${keys.rsa8!.keyFile}}`), async (source) => {
      await source.fetch();
      const first = lastAssertion();
      await source.fetch();
      const second = lastAssertion();
      assert.notEqual(first, second);
      const jti = (a: string) => JSON.parse(Buffer.from(a.split('.')[1]!, 'base64url').toString()).jti;
      assert.notEqual(jti(first), jti(second));
      // No certificate configured: no thumbprints in the header.
      assert.deepEqual(decodeProtectedHeader(second), { alg: 'RS256', typ: 'JWT' });
    });
  });

  test('a PKCS#1 RSA key and a SEC1 EC key (ES256) are read as they are', async () => {
    for (const [name, alg] of [['rsa1', 'RS256'], ['ec1', 'ES256']] as const) {
      assert.match(keys[name]!.key, name === 'rsa1' ? /BEGIN RSA PRIVATE KEY/ : /BEGIN EC PRIVATE KEY/);
      await withSource(config(`privateKey: \${file:${keys[name]!.keyFile}}\ncertificate: \${file:${keys[name]!.certFile}}`), async (source) => {
        await server.verify((await source.fetch()).accessToken);
        assert.equal(decodeProtectedHeader(lastAssertion()).alg, alg);
      });
    }
  });

  test('PS256 when asked, an audience other than the token URL, a shorter lifetime', async () => {
    await withSource(config(`privateKey: \${file:${keys.rsa8!.keyFile}}\nassertion:\n  algorithm: PS256\n  audience: ${server.issuer}\n  lifetimeSeconds: 60`), async (source) => {
      await source.fetch();
      const { payload, protectedHeader } = await jwtVerify(lastAssertion(), createPublicKey(keys.rsa8!.key));
      assert.equal(protectedHeader.alg, 'PS256');
      assert.equal(payload.aud, server.issuer);
      assert.equal(payload.exp, payload.iat! + 60);
    });
  });

  test('a key and certificate replaced on disk are used by the next fetch, without a restart', async () => {
    const { keyFile, certFile } = pki.copy(keys.rsa8!, 'live');
    await withSource(config(`privateKey: \${file:${keyFile}}\ncertificate: \${file:${certFile}}`), async (source) => {
      await source.fetch();
      assert.equal(decodeProtectedHeader(lastAssertion())['x5t#S256'], thumbprints(keys.rsa8!.cert).s256);
      pki.copy(keys.next!, 'live');
      await source.fetch();
      const assertion = lastAssertion();
      assert.equal(decodeProtectedHeader(assertion)['x5t#S256'], thumbprints(keys.next!.cert).s256);
      await jwtVerify(assertion, createPublicKey(keys.next!.key));
    });
  });

  test('a key that does not match its certificate is a config error at start, by path', () => {
    assert.throws(() => config(`privateKey: \${file:${keys.rsa8!.keyFile}}\ncertificate: \${file:${keys.rsa1!.certFile}}`), (err) => {
      assert.ok(err instanceof ConfigError);
      assert.deepEqual(err.problems.map((p) => `${p.path}: ${p.message}`), [
        'profiles.default.certificate: does not match privateKey (the certificate is for CN=rsa1)',
      ]);
      return true;
    });
  });

  test('a key rotated on disk to one its certificate does not match fails that fetch with a coded error, not a crash', async () => {
    const keyFile = join(pki.dir, 'drift.key');
    copyFileSync(keys.rsa8!.keyFile, keyFile);
    await withSource(config(`privateKey: \${file:${keyFile}}\ncertificate: \${file:${keys.rsa8!.certFile}}`), async (source) => {
      copyFileSync(keys.next!.keyFile, keyFile);
      await assert.rejects(source.fetch(), {
        name: 'ClientAuthError',
        code: 'OAUTH2_ERR_CLIENT_AUTH',
        message: `the private key of profile default (file ${keyFile}) does not match the certificate of profile default (file ${keys.rsa8!.certFile}), which is for CN=rsa8`,
      });
    });
  });

  test('a file that cannot be read is OAUTH2_ERR_SECRET naming its path; one read but not usable is OAUTH2_ERR_CLIENT_AUTH', async () => {
    const { keyFile, certFile } = pki.copy(keys.rsa8!, 'moving');
    await withSource(config(`privateKey: \${file:${keyFile}}\ncertificate: \${file:${certFile}}`), async (source) => {
      rmSync(certFile);
      await assert.rejects(source.fetch(), {
        name: 'SecretReadError', code: 'OAUTH2_ERR_SECRET', message: `cannot read the certificate of profile default (file ${certFile}: ENOENT)`,
      });
      writeFileSync(certFile, '');
      await assert.rejects(source.fetch(), {
        name: 'SecretReadError', code: 'OAUTH2_ERR_SECRET', message: `the certificate of profile default (file ${certFile}) is empty`,
      });
      writeFileSync(certFile, '-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n');
      await assert.rejects(source.fetch(), {
        name: 'ClientAuthError', code: 'OAUTH2_ERR_CLIENT_AUTH', message: `the certificate of profile default (file ${certFile}) is not a PEM certificate`,
      });
      copyFileSync(keys.rsa8!.certFile, certFile);
      writeFileSync(keyFile, '-----BEGIN PRIVATE KEY-----\ntruncated\n');
      await assert.rejects(source.fetch(), (err) => {
        assert.equal((err as Error).name, 'ClientAuthError');
        assert.equal((err as { code: string }).code, 'OAUTH2_ERR_CLIENT_AUTH');
        assert.ok((err as Error).message.startsWith(`the private key of profile default (file ${keyFile}) is not a PEM private key `), (err as Error).message);
        return true;
      });
      copyFileSync(keys.ec1!.keyFile, keyFile);
      await assert.rejects(source.fetch(), { name: 'ClientAuthError', code: 'OAUTH2_ERR_CLIENT_AUTH' });
    });
  });

  test('the validator names what a method does not use, and what it needs', () => {
    const problems = (text: string): string[] => configProblems(text, { env: {}, baseDir: pki.dir });
    assert.deepEqual(problems(configText('clientSecret: not-needed\ntokenFile: /var/run/token')), [
      'profiles.default.clientSecret: not used with clientAuth private_key_jwt',
      'profiles.default.privateKey: required with clientAuth private_key_jwt',
      'profiles.default.tokenFile: not used with clientAuth private_key_jwt',
    ]);
    writeFileSync(join(pki.dir, 'not-a-key.pem'), 'hello\n');
    assert.deepEqual(problems(configText('privateKey: ${file:not-a-key.pem}\nassertion: { algorithm: HS256 }')), [
      'profiles.default.assertion.algorithm: must be one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512',
      'profiles.default.privateKey: is not a PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC; encrypted keys are not supported) (ERR_OSSL_UNSUPPORTED)',
    ]);
    assert.deepEqual(problems(configText(`privateKey: \${file:${keys.ec1!.keyFile}}\nassertion: { algorithm: RS256 }`)), [
      'profiles.default.assertion.algorithm: RS256 needs an RSA key, this is an EC key (prime256v1)',
    ]);
  });

  test('without tls.ca the private CA is not trusted: a coded network error', async () => {
    const p = parseConfig(configText(`privateKey: \${file:${keys.rsa8!.keyFile}}`), { env: {}, baseDir: pki.dir }).profiles.default!;
    await withSource(p, async (source) => {
      await assert.rejects(source.fetch(), (err) => {
        assert.ok(err instanceof TokenNetworkError);
        assert.match(err.message, /^cannot reach the token endpoint https:\/\/127\.0\.0\.1:\d+ \((UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)\)$/);
        return true;
      });
    });
  });

  test('the server rejecting the assertion is its OAuth2 error, with no assertion in it', async () => {
    const other = pki.client('unregistered', 'rsa-pkcs8');
    await withSource(config(`privateKey: \${file:${other.keyFile}}`), async (source) => {
      await assert.rejects(source.fetch(), (err) => {
        assert.ok(err instanceof TokenEndpointError);
        assert.equal(err.status, 401);
        assert.equal(err.oauthError, 'invalid_client');
        assert.ok(!err.message.includes(lastAssertion().split('.')[2]!));
        return true;
      });
    });
  });

  test('HTTPS_PROXY: the request goes through the proxy as a CONNECT tunnel, and NO_PROXY bypasses it', async () => {
    const before = proxy.tunnels.length;
    await withSource(config(`privateKey: \${file:${keys.rsa8!.keyFile}}`, { HTTPS_PROXY: proxy.url }), async (viaProxy) => {
      await server.verify((await viaProxy.fetch()).accessToken);
      assert.deepEqual(proxy.tunnels.slice(before), [new URL(server.tokenUrl).host]);
    });
    await withSource(config(`privateKey: \${file:${keys.rsa8!.keyFile}}`, { https_proxy: proxy.url, NO_PROXY: 'localhost,127.0.0.1' }), async (bypass) => {
      await bypass.fetch();
      assert.equal(proxy.tunnels.length, before + 1);
    });
  });
});
