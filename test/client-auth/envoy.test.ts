// The new methods end to end: the sidecar process gets its tokens with private_key_jwt,
// tls_client_auth, workload_identity and managed_identity, and the backend behind the real Envoy
// (shipped envoy/envoy.yaml: `default` for most routes, `reports` for /reports/) receives them.
import assert from 'node:assert/strict';
import { createHash, createPublicKey, generateKeyPairSync, randomUUID, X509Certificate } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { decodeJwt, exportJWK, SignJWT } from 'jose';
import { startAzureIdentityServer, type AzureIdentityServer } from '../helpers/azure-identity-server.ts';
import { headerValues, startEchoBackend, type EchoBackend } from '../helpers/echo-backend.ts';
import { ENVOY_MISSING, findEnvoy, send, startEnvoy } from '../helpers/envoy.ts';
import { startOAuthServer, type OAuthServer } from '../helpers/oauth-server.ts';
import { createPki, type Issued, type Pki } from '../helpers/pki.ts';
import { startSidecar } from '../helpers/sidecar.ts';

const skip = findEnvoy() === undefined && !process.env.CI ? ENVOY_MISSING : false;

let pki: Pki;
let idp: OAuthServer;
let azure: AzureIdentityServer;
let backend: EchoBackend;
let dir: string;
let jwtKey: Issued;
let mtlsKey: Issued;
const cluster = generateKeyPairSync('ec', { namedCurve: 'P-256' });

before(async () => {
  if (skip) return;
  pki = createPki();
  dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-envoy-auth-'));
  jwtKey = pki.client('orders-jwt', 'rsa-pkcs8');
  mtlsKey = pki.client('orders-mtls', 'ec-sec1');
  idp = await startOAuthServer({
    tls: { key: pki.server.key, cert: pki.server.cert, clientCa: pki.ca.cert },
    mtls: true,
    clients: [
      { client_id: 'orders-jwt', token_endpoint_auth_method: 'private_key_jwt', jwks: { keys: [await exportJWK(createPublicKey(jwtKey.key))] } },
      {
        client_id: 'orders-mtls', token_endpoint_auth_method: 'tls_client_auth', tls_client_auth_subject_dn: 'CN=orders-mtls',
        tls_client_certificate_bound_access_tokens: true,
      },
      { client_id: 'orders-workload', token_endpoint_auth_method: 'private_key_jwt', jwks: { keys: [await exportJWK(cluster.publicKey)] } },
    ],
  });
  azure = await startAzureIdentityServer();
  backend = await startEchoBackend();
});

after(async () => {
  if (skip) return;
  await backend.close();
  await azure.close();
  await idp.close();
  pki.remove();
  rmSync(dir, { recursive: true, force: true });
});

async function tokensThroughEnvoy(profiles: Record<string, unknown>, env: NodeJS.ProcessEnv = {}): Promise<{ orders: string; reports: string }> {
  const sidecar = await startSidecar({ config: { profiles }, env });
  try {
    const envoy = await startEnvoy({ config: 'envoy.yaml', clusters: { oauth2_extproc: sidecar.grpcAddress, backend: backend.address } });
    try {
      const bearer = async (path: string): Promise<string> => {
        const reply = await send(`${envoy.url}${path}`, { headers: ['ocp-apim-subscription-key', 'caller-key'] });
        assert.equal(reply.status, 200, reply.body);
        const received = backend.requests.at(-1)!;
        assert.deepEqual(headerValues(received, 'ocp-apim-subscription-key'), []);
        const [value] = headerValues(received, 'authorization');
        assert.match(value ?? '', /^Bearer \S+$/);
        return value!.slice('Bearer '.length);
      };
      return { orders: await bearer('/orders/1'), reports: await bearer('/reports/1') };
    } finally {
      await envoy.stop();
    }
  } finally {
    assert.equal(await sidecar.stop(), 0);
  }
}

const tls = (): Record<string, unknown> => ({ tokenUrl: idp.tokenUrl, tls: { ca: `\${file:${pki.ca.certFile}}` } });

test('private_key_jwt (default) and managed_identity through IMDS (reports): both tokens reach the backend', { skip }, async () => {
  const { orders, reports } = await tokensThroughEnvoy({
    default: { ...tls(), clientAuth: 'private_key_jwt', clientId: 'orders-jwt', privateKey: `\${file:${jwtKey.keyFile}}`, certificate: `\${file:${jwtKey.certFile}}` },
    reports: { clientAuth: 'managed_identity', identityEndpoint: azure.origin, scope: 'https://reports.example/.default' },
  });
  assert.equal((await idp.verify(orders)).client_id, 'orders-jwt');
  assert.ok(azure.issued.includes(reports));
  assert.equal(decodeJwt(reports).aud, 'https://reports.example');
});

test('tls_client_auth (default, certificate-bound) and workload_identity (reports): both tokens reach the backend', { skip }, async () => {
  const now = Math.floor(Date.now() / 1000);
  const projected = await new SignJWT({}).setProtectedHeader({ alg: 'ES256' }).setIssuer('orders-workload').setSubject('orders-workload')
    .setAudience(idp.tokenUrl).setJti(randomUUID()).setIssuedAt(now).setExpirationTime(now + 3600).sign(cluster.privateKey);
  writeFileSync(join(dir, 'azure-identity-token'), projected);
  const { orders, reports } = await tokensThroughEnvoy({
    default: { ...tls(), clientAuth: 'tls_client_auth', clientId: 'orders-mtls', certificate: `\${file:${mtlsKey.certFile}}`, privateKey: `\${file:${mtlsKey.keyFile}}` },
    reports: { ...tls(), clientAuth: 'workload_identity' },
  }, { AZURE_FEDERATED_TOKEN_FILE: join(dir, 'azure-identity-token'), AZURE_CLIENT_ID: 'orders-workload' });
  const mtlsClaims = await idp.verify(orders);
  assert.equal(mtlsClaims.client_id, 'orders-mtls');
  assert.deepEqual(mtlsClaims.cnf, { 'x5t#S256': createHash('sha256').update(new X509Certificate(mtlsKey.cert).raw).digest('base64url') });
  assert.equal((await idp.verify(reports)).client_id, 'orders-workload');
});
