// workload_identity: the projected token file is the client assertion. The IdP here is
// oidc-provider, which accepts a JWT signed by a key it was given (as Entra accepts a
// federated credential's issuer): the "cluster" signs the token file, as the kubelet would.
import assert from 'node:assert/strict';
import { generateKeyPairSync, randomUUID, type KeyObject } from 'node:crypto';
import { mkdtempSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { exportJWK, SignJWT } from 'jose';
import { parseConfig, type ProfileConfig } from '../../src/config.ts';
import { ConfigError, SecretReadError } from '../../src/errors.ts';
import { TokenSource } from '../../src/token-source.ts';
import { startOAuthServer, type OAuthServer } from '../helpers/oauth-server.ts';

let server: OAuthServer;
let dir: string;
let clusterKey: KeyObject;
const CLIENT_ID = '0c7e3b1a-orders-workload';

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-wi-'));
  const pair = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  clusterKey = pair.privateKey;
  server = await startOAuthServer({
    clients: [{
      client_id: CLIENT_ID,
      token_endpoint_auth_method: 'private_key_jwt',
      jwks: { keys: [{ ...(await exportJWK(pair.publicKey)), kid: 'cluster' }] },
    }],
  });
});

after(async () => {
  await server.close();
  rmSync(dir, { recursive: true, force: true });
});

/** What the kubelet writes into the projected volume (a fresh token each time it rotates). */
async function projectedToken(): Promise<string> {
  const now = Math.floor(Date.now() / 1000);
  return new SignJWT({ 'kubernetes.io': { namespace: 'orders', serviceaccount: { name: 'orders-sidecar' } } })
    .setProtectedHeader({ alg: 'ES256', kid: 'cluster' })
    // oidc-provider wants iss = sub = client_id; Entra matches a federated credential instead.
    .setIssuer(CLIENT_ID).setSubject(CLIENT_ID).setAudience(server.tokenUrl)
    .setJti(randomUUID()).setIssuedAt(now).setExpirationTime(now + 3600)
    .sign(clusterKey);
}

function profile(env: NodeJS.ProcessEnv, extra = ''): ProfileConfig {
  return parseConfig(`
profiles:
  default:
    clientAuth: workload_identity
    tokenUrl: ${server.tokenUrl}
${extra.replace(/^/gm, '    ')}
`, { env, baseDir: dir }).profiles.default!;
}

describe('workload_identity', () => {
  test('the token file is sent as client_assertion, with the AZURE_* defaults for file and client id', async () => {
    const file = join(dir, 'azure-identity-token');
    const jwt = await projectedToken();
    writeFileSync(file, `${jwt}\n`);
    const source = new TokenSource(profile({ AZURE_FEDERATED_TOKEN_FILE: file, AZURE_CLIENT_ID: CLIENT_ID }));
    const claims = await server.verify((await source.fetch()).accessToken);
    assert.equal(claims.client_id, CLIENT_ID);
    const form = server.tokenRequests.at(-1)!.form;
    assert.deepEqual(Object.fromEntries(form), {
      grant_type: 'client_credentials',
      client_id: CLIENT_ID,
      client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
      client_assertion: jwt,
    });
  });

  test('the file is read at every fetch, never cached: a rotated token is sent next time', async () => {
    const file = join(dir, 'rotating-token');
    const one = await projectedToken();
    writeFileSync(file, one);
    const source = new TokenSource(profile({}, `tokenFile: ${file}\nclientId: ${CLIENT_ID}`));
    await source.fetch();
    assert.equal(server.tokenRequests.at(-1)!.form.get('client_assertion'), one);
    const two = await projectedToken();
    writeFileSync(file, two);
    await source.fetch();
    assert.equal(server.tokenRequests.at(-1)!.form.get('client_assertion'), two);
  });

  test('a token file that disappears or is empty is a coded error naming the path', async () => {
    const file = join(dir, 'vanishing-token');
    writeFileSync(file, await projectedToken());
    const source = new TokenSource(profile({}, `tokenFile: ${file}\nclientId: ${CLIENT_ID}`));
    unlinkSync(file);
    await assert.rejects(source.fetch(), (err) => {
      assert.ok(err instanceof SecretReadError);
      assert.equal(err.code, 'OAUTH2_ERR_SECRET');
      assert.equal(err.message, `cannot read the token file ${file} of profile default (ENOENT)`);
      return true;
    });
    writeFileSync(file, '\n');
    await assert.rejects(source.fetch(), { code: 'OAUTH2_ERR_SECRET', message: `the token file ${file} of profile default is empty` });
  });

  test('the AZURE_* defaults of the Azure Workload Identity webhook, and what is missing without them', () => {
    const file = join(dir, 'defaults-token');
    writeFileSync(file, 'x.y.z');
    const p = parseConfig('profiles:\n  default:\n    clientAuth: workload_identity\n    scope: api://orders/.default\n', {
      env: {
        AZURE_FEDERATED_TOKEN_FILE: file,
        AZURE_CLIENT_ID: CLIENT_ID,
        AZURE_TENANT_ID: 'contoso-tenant',
        AZURE_AUTHORITY_HOST: 'https://login.microsoftonline.com/',
      },
    }).profiles.default!;
    assert.equal(p.tokenUrl, 'https://login.microsoftonline.com/contoso-tenant/oauth2/v2.0/token');
    assert.equal(p.tokenFile, file);
    assert.equal(p.clientId.read(), CLIENT_ID);

    assert.throws(() => parseConfig('profiles:\n  default:\n    clientAuth: workload_identity\n    clientSecret: s\n', { env: {} }), (err) => {
      assert.ok(err instanceof ConfigError);
      assert.deepEqual(err.problems.map((q) => `${q.path}: ${q.message}`), [
        'profiles.default.clientSecret: not used with clientAuth workload_identity',
        'profiles.default.tokenFile: required with clientAuth workload_identity (or set AZURE_FEDERATED_TOKEN_FILE)',
        'profiles.default.clientId: required with clientAuth workload_identity (or set AZURE_CLIENT_ID)',
        'profiles.default.tokenUrl: required with clientAuth workload_identity (or set AZURE_AUTHORITY_HOST and AZURE_TENANT_ID)',
      ]);
      return true;
    });
    assert.throws(
      () => parseConfig(`profiles:\n  default:\n    clientAuth: workload_identity\n    tokenUrl: ${server.tokenUrl}\n    clientId: c\n    tokenFile: ${join(dir, 'nope')}\n`, { env: {} }),
      { message: `profiles.default.tokenFile: cannot read ${join(dir, 'nope')} (ENOENT)` },
    );
  });
});
