// managed_identity against a server that answers as Microsoft documents IMDS and the App
// Service identity endpoint (test/helpers/azure-identity-server.ts says which documents).
// Never 169.254.169.254: identityEndpoint or IDENTITY_ENDPOINT always point at 127.0.0.1.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { parseExpiresOn } from '../../src/client-auth/managed-identity.ts';
import { parseConfig, type ProfileConfig } from '../../src/config.ts';
import { ClientAuthError, ConfigError, TokenEndpointError } from '../../src/errors.ts';
import { TokenSource } from '../../src/token-source.ts';
import { azureDate, IMDS_PATH, startAzureIdentityServer, type AzureIdentityServer } from '../helpers/azure-identity-server.ts';
import { startConnectProxy, type ConnectProxy } from '../helpers/connect-proxy.ts';
import { FakeClock } from '../helpers/fake-clock.ts';

let azure: AzureIdentityServer;
let proxy: ConnectProxy;

before(async () => {
  azure = await startAzureIdentityServer();
  proxy = await startConnectProxy();
});

after(async () => {
  await proxy.close();
  await azure.close();
});

function imds(extra: string, env: NodeJS.ProcessEnv = {}): ProfileConfig {
  return parseConfig(`
profiles:
  default:
    clientAuth: managed_identity
    identityEndpoint: ${azure.origin}
${extra.replace(/^/gm, '    ')}
`, { env }).profiles.default!;
}

describe('managed_identity: IMDS', () => {
  test('GET with Metadata: true, api-version 2018-02-01, the resource from a /.default scope; string numbers read', async () => {
    const clock = new FakeClock(Date.now());
    const token = await new TokenSource(imds('scope: https://vault.azure.net/.default'), { clock }).fetch();
    const request = azure.requests.at(-1)!;
    assert.equal(request.path, IMDS_PATH);
    assert.deepEqual(Object.fromEntries(request.query), { 'api-version': '2018-02-01', resource: 'https://vault.azure.net' });
    assert.equal(request.headers.metadata, 'true');
    assert.equal(token.accessToken, azure.issued.at(-1));
    assert.equal(token.tokenType, 'Bearer');
    // expires_in arrives as "3600".
    assert.equal(token.expiresAt - token.obtainedAt, 3600_000);
  });

  test('a user-assigned identity by client id, object id or resource id', async () => {
    for (const [key, param, value] of [
      ['clientId', 'client_id', azure.userAssigned.clientId],
      ['objectId', 'object_id', azure.userAssigned.objectId],
      ['resourceId', 'msi_res_id', azure.userAssigned.resourceId],
    ] as const) {
      await new TokenSource(imds(`resource: https://management.azure.com/\n${key}: ${value}`)).fetch();
      assert.equal(azure.requests.at(-1)!.query.get(param), value);
    }
    await assert.rejects(new TokenSource(imds('resource: https://management.azure.com/\nclientId: 00000000-unknown')).fetch(), (err) => {
      assert.ok(err instanceof TokenEndpointError);
      assert.equal(err.status, 400);
      assert.equal(err.oauthErrorDescription, 'Identity not found');
      return true;
    });
  });

  test('410 while IMDS updates and 503 are retried within the fetch; a 400 is not', async () => {
    const before = azure.requests.length;
    azure.fail(410, 503);
    const token = await new TokenSource(imds('resource: https://vault.azure.net')).fetch();
    assert.equal(token.accessToken, azure.issued.at(-1));
    assert.equal(azure.requests.length - before, 3);

    const again = azure.requests.length;
    azure.fail(400);
    await assert.rejects(new TokenSource(imds('resource: https://vault.azure.net')).fetch(), { code: 'OAUTH2_ERR_TOKEN_STATUS' });
    assert.equal(azure.requests.length - again, 1);
  });

  test('never through a proxy, even with HTTP_PROXY and HTTPS_PROXY set', async () => {
    const p = imds('resource: https://vault.azure.net', { HTTP_PROXY: proxy.url, HTTPS_PROXY: proxy.url });
    assert.equal(p.proxy, undefined);
    await new TokenSource(p).fetch();
    assert.deepEqual([proxy.tunnels, proxy.forwarded], [[], []]);
  });
});

describe('managed_identity: App Service / Container Apps (IDENTITY_ENDPOINT, IDENTITY_HEADER)', () => {
  const env = (): NodeJS.ProcessEnv => ({ IDENTITY_ENDPOINT: azure.appServiceEndpoint, IDENTITY_HEADER: azure.identityHeader });
  const profile = (extra: string): ProfileConfig =>
    parseConfig(`profiles:\n  default:\n    clientAuth: managed_identity\n${extra.replace(/^/gm, '    ')}\n`, { env: env() }).profiles.default!;

  test('X-IDENTITY-HEADER, api-version 2019-08-01, principal_id; expires_on as epoch seconds', async () => {
    azure.expiresOnFormat = 'epoch';
    const token = await new TokenSource(profile(`resource: https://vault.azure.net\nobjectId: ${azure.userAssigned.objectId}`)).fetch();
    const request = azure.requests.at(-1)!;
    assert.equal(request.headers['x-identity-header'], azure.identityHeader);
    assert.equal(request.headers.metadata, undefined);
    assert.deepEqual(Object.fromEntries(request.query), {
      'api-version': '2019-08-01', resource: 'https://vault.azure.net', principal_id: azure.userAssigned.objectId,
    });
    const lifetime = (token.expiresAt - token.obtainedAt) / 1000;
    assert.ok(lifetime > 3590 && lifetime <= 3600, `lifetime ${lifetime}`);
  });

  test('expires_on as a date ("11/24/2026 10:00:00 +00:00")', async () => {
    azure.expiresOnFormat = 'date';
    try {
      const token = await new TokenSource(profile('resource: https://vault.azure.net')).fetch();
      const lifetime = (token.expiresAt - token.obtainedAt) / 1000;
      assert.ok(lifetime > 3590 && lifetime <= 3600, `lifetime ${lifetime}`);
    } finally {
      azure.expiresOnFormat = 'epoch';
    }
  });

  test('a wrong IDENTITY_HEADER is the endpoint\'s error, with the header value masked', async () => {
    const p = parseConfig('profiles:\n  default:\n    clientAuth: managed_identity\n    resource: https://vault.azure.net\n', {
      env: { IDENTITY_ENDPOINT: azure.appServiceEndpoint, IDENTITY_HEADER: 'wrong-header-value' },
    }).profiles.default!;
    await assert.rejects(new TokenSource(p).fetch(), (err) => {
      assert.ok(err instanceof TokenEndpointError);
      assert.equal(err.status, 400);
      assert.ok(!err.message.includes('wrong-header-value'));
      return true;
    });
  });
});

describe('managed_identity: Azure Arc-enabled server (IDENTITY_ENDPOINT, IMDS_ENDPOINT, a key-file challenge)', () => {
  const env = (): NodeJS.ProcessEnv => ({ IDENTITY_ENDPOINT: azure.arcEndpoint, IMDS_ENDPOINT: azure.arcImdsEndpoint });
  const profile = (extra = 'resource: https://vault.azure.net', more: NodeJS.ProcessEnv = {}): ProfileConfig =>
    parseConfig(`profiles:\n  default:\n    clientAuth: managed_identity\n${extra.replace(/^/gm, '    ')}\n`, {
      env: { ...env(), ...more }, arcKeyDir: azure.arcKeyDir,
    }).profiles.default!;
  const arcRequests = (): typeof azure.requests => azure.requests.filter((r) => r.headers.host === new URL(azure.arcEndpoint).host);

  test('the 401 names a key file; the request is repeated with Authorization: Basic <its contents>, api-version 2020-06-01', async () => {
    const before = arcRequests().length;
    const p = profile();
    assert.deepEqual({ kind: p.managedIdentity?.kind, url: p.managedIdentity?.url, dir: p.managedIdentity?.arcKeyDir }, {
      kind: 'arc', url: azure.arcEndpoint, dir: azure.arcKeyDir,
    });
    const token = await new TokenSource(p).fetch();
    assert.equal(token.accessToken, azure.issued.at(-1));
    const [first, second, ...more] = arcRequests().slice(before);
    assert.equal(more.length, 0);
    for (const r of [first!, second!]) {
      assert.equal(r.headers.metadata, 'true');
      assert.deepEqual(Object.fromEntries(r.query), { 'api-version': '2020-06-01', resource: 'https://vault.azure.net' });
    }
    assert.equal(first!.headers.authorization, undefined);
    assert.match(second!.headers.authorization ?? '', /^Basic [0-9a-f]{64}$/);
  });

  test('never through a proxy, even with HTTP_PROXY set', async () => {
    await new TokenSource(profile(undefined, { HTTP_PROXY: proxy.url, HTTPS_PROXY: proxy.url })).fetch();
    assert.deepEqual([proxy.tunnels, proxy.forwarded], [[], []]);
  });

  test('a challenge naming a file outside the tokens folder, or not a .key file, is refused and that file is not sent', async () => {
    const elsewhere = mkdtempSync(join(tmpdir(), 'not-arc-'));
    const outside = join(elsewhere, 'stolen.key');
    writeFileSync(outside, 'contents-that-must-not-leave');
    const inDirNotKey = join(azure.arcKeyDir, 'agent.conf');
    writeFileSync(inDirNotKey, 'not-a-key-file');
    try {
      for (const realm of [outside, inDirNotKey, `${azure.arcKeyDir}/../${elsewhere.split('/').at(-1)}/stolen.key`]) {
        azure.arc.realm = realm;
        const before = arcRequests().length;
        await assert.rejects(new TokenSource(profile()).fetch(), (err) => {
          assert.ok(err instanceof ClientAuthError, String(err));
          assert.equal(err.code, 'OAUTH2_ERR_CLIENT_AUTH');
          assert.match(err.message, /which is not a \.key file in /);
          return true;
        });
        assert.equal(arcRequests().length - before, 1);
      }
    } finally {
      azure.arc.realm = undefined;
      rmSync(elsewhere, { recursive: true, force: true });
    }
  });

  test('a key file that cannot be read is OAUTH2_ERR_SECRET naming the path', async () => {
    const missing = join(azure.arcKeyDir, 'gone.key');
    azure.arc.realm = missing;
    try {
      await assert.rejects(new TokenSource(profile()).fetch(), {
        code: 'OAUTH2_ERR_SECRET', message: `cannot read the Azure Arc key file ${missing} of profile default (ENOENT)`,
      });
    } finally {
      azure.arc.realm = undefined;
    }
  });

  test('the key file\'s contents, echoed back by the endpoint, are masked in the error', async () => {
    azure.arc.echoAuthorization = true;
    try {
      await assert.rejects(new TokenSource(profile()).fetch(), (err) => {
        assert.ok(err instanceof TokenEndpointError);
        assert.equal(err.status, 400);
        const sent = arcRequests().at(-1)!.headers.authorization!.slice('Basic '.length);
        const text = JSON.stringify({ message: err.message, description: err.oauthErrorDescription });
        assert.ok(!text.includes(sent), text);
        assert.match(err.message, /Authorization: Basic /);
        return true;
      });
    } finally {
      azure.arc.echoAuthorization = false;
    }
  });

  test('config: a user-assigned identity on Arc, and IDENTITY_ENDPOINT alone, are problems by path', () => {
    assert.throws(() => profile(`resource: https://vault.azure.net\nclientId: ${azure.userAssigned.clientId}`), {
      message: 'profiles.default.clientId: an Azure Arc-enabled server has only its system-assigned identity',
    });
    assert.throws(() => parseConfig('profiles:\n  default:\n    clientAuth: managed_identity\n    resource: https://vault.azure.net\n', {
      env: { IDENTITY_ENDPOINT: azure.arcEndpoint },
    }), {
      message: 'profiles.default.clientAuth: IDENTITY_ENDPOINT is set without IDENTITY_HEADER (App Service, Container Apps) or IMDS_ENDPOINT (Azure Arc): set both of one pair, or identityEndpoint',
    });
  });
});

test('expires_on: epoch seconds, numeric strings, and the dates Azure writes (24-hour and AM/PM)', () => {
  assert.equal(parseExpiresOn(1_795_000_000), 1_795_000_000);
  assert.equal(parseExpiresOn('1795000000'), 1_795_000_000);
  assert.equal(parseExpiresOn('11/24/2026 10:00:00 +00:00'), Date.UTC(2026, 10, 24, 10) / 1000);
  assert.equal(parseExpiresOn('09/14/2017 00:00:00 PM +00:00'), Date.UTC(2017, 8, 14, 12) / 1000);
  assert.equal(parseExpiresOn('11/24/2026 12:30:00 AM +00:00'), Date.UTC(2026, 10, 24, 0, 30) / 1000);
  assert.equal(parseExpiresOn('11/24/2026 10:00:00 +01:00'), Date.UTC(2026, 10, 24, 9) / 1000);
  assert.equal(parseExpiresOn(azureDate(1_795_000_000)), 1_795_000_000);
  assert.equal(parseExpiresOn('tomorrow'), undefined);
});

test('the validator: no tokenUrl, no secret, one resource, one way to name a user-assigned identity', () => {
  assert.throws(() => parseConfig(`
profiles:
  default:
    clientAuth: managed_identity
    tokenUrl: https://login.microsoftonline.com/t/oauth2/v2.0/token
    clientSecret: s
    scope: api://orders/read
    clientId: a
    objectId: b
    tls: { ca: x }
`, { env: {} }), (err) => {
    assert.ok(err instanceof ConfigError);
    assert.deepEqual(err.problems.map((q) => `${q.path}: ${q.message}`), [
      'profiles.default.tokenUrl: not used with clientAuth managed_identity',
      'profiles.default.clientSecret: not used with clientAuth managed_identity',
      'profiles.default.tls: not used with clientAuth managed_identity',
      'profiles.default.objectId: a user-assigned identity is named by one of clientId, objectId, resourceId (clientId and objectId are set)',
      'profiles.default.scope: managed_identity asks for one resource: write resource, or one scope ending in /.default',
    ]);
    return true;
  });
  assert.throws(() => parseConfig('profiles:\n  default:\n    clientAuth: managed_identity\n    resource: https://vault.azure.net\n    scope: https://storage.azure.com/.default\n', { env: {} }), {
    message: 'profiles.default.scope: not used with resource (managed_identity asks for one resource)',
  });
  assert.throws(() => parseConfig('profiles:\n  default:\n    clientAuth: managed_identity\n', { env: {} }), {
    message: 'profiles.default.resource: required with clientAuth managed_identity (or a scope ending in /.default)',
  });
  const p = parseConfig('profiles:\n  default:\n    clientAuth: managed_identity\n    resource: https://vault.azure.net\n', { env: {} }).profiles.default!;
  assert.deepEqual(p.managedIdentity, {
    kind: 'imds', url: 'http://169.254.169.254/metadata/identity/oauth2/token', identityHeader: undefined,
    clientId: undefined, objectId: undefined, resourceId: undefined,
  });
});
