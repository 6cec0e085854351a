// The client-authentication part of a profile: per `clientAuth` method, which keys are
// required, which are allowed and which mean nothing (said by path, so a key that would be
// silently ignored is an error), the AZURE_* defaults, and the key/certificate checks done
// once at start (and by check-config) so a mismatched pair fails before a port is bound.
import { readFileSync } from 'node:fs';
import { isAbsolute, join, resolve } from 'node:path';
import { IMDS_TOKEN_URL } from './client-auth/managed-identity.ts';
import {
  algorithmMismatch, certificateFacts, defaultAlgorithm, keyMatchesCertificate, loadCertificate, loadPrivateKey, pemCertificates,
  ASSERTION_ALGORITHMS, type AssertionAlgorithm,
} from './client-auth/keys.ts';
import { CLIENT_AUTH_METHODS, type AssertionConfig, type ClientAuth, type ManagedIdentityConfig, type ProfileConfig, type SecretValue } from './config-types.ts';
import type { Validator } from './config-validator.ts';
import { DEFAULT_ASSERTION_LIFETIME_SECONDS } from './client-auth/private-key-jwt.ts';

/** Every key that belongs to one method or another; the rest of a profile applies to all. */
const AUTH_KEYS = [
  'tokenUrl', 'clientId', 'clientSecret', 'privateKey', 'certificate', 'keyId', 'assertion', 'tokenFile',
  'objectId', 'resourceId', 'identityEndpoint', 'tls', 'audience', 'extraParams',
] as const;
type AuthKey = (typeof AUTH_KEYS)[number];
export const CLIENT_AUTH_KEYS: readonly string[] = AUTH_KEYS;

/** Per method: the keys it needs (some have environment defaults) and the ones it also reads. */
const METHOD_KEYS: Record<ClientAuth, { required: readonly AuthKey[]; optional: readonly AuthKey[] }> = {
  client_secret_post: { required: ['tokenUrl', 'clientId', 'clientSecret'], optional: ['tls', 'audience', 'extraParams'] },
  client_secret_basic: { required: ['tokenUrl', 'clientId', 'clientSecret'], optional: ['tls', 'audience', 'extraParams'] },
  private_key_jwt: {
    required: ['tokenUrl', 'clientId', 'privateKey'],
    optional: ['certificate', 'keyId', 'assertion', 'tls', 'audience', 'extraParams'],
  },
  tls_client_auth: { required: ['tokenUrl', 'clientId', 'certificate', 'privateKey'], optional: ['tls', 'audience', 'extraParams'] },
  // Required too, but each has an AZURE_* default: checked below.
  workload_identity: { required: [], optional: ['tokenUrl', 'clientId', 'tokenFile', 'tls', 'audience', 'extraParams'] },
  managed_identity: { required: [], optional: ['clientId', 'objectId', 'resourceId', 'identityEndpoint'] },
};

export type ClientAuthFields = Pick<
  ProfileConfig,
  'clientAuth' | 'tokenUrl' | 'clientId' | 'clientSecret' | 'privateKey' | 'certificate' | 'keyId' | 'assertion' | 'tokenFile' | 'managedIdentity' | 'tls'
> & { resource: string | undefined };

const emptySecret: SecretValue = { read: () => '' };

export function parseClientAuth(
  v: Validator,
  at: string,
  p: Record<string, unknown>,
  env: NodeJS.ProcessEnv,
  baseDir: string,
  scope: string | undefined,
  resourceIn: string | undefined,
  arcKeyDir: string | undefined,
): ClientAuthFields {
  const clientAuth = v.oneOf(p.clientAuth, `${at}.clientAuth`, [...CLIENT_AUTH_METHODS], 'client_secret_post');
  const keys = METHOD_KEYS[clientAuth];
  const legacy = clientAuth === 'client_secret_post' || clientAuth === 'client_secret_basic';
  const needs = legacy ? 'required' : `required with clientAuth ${clientAuth}`;
  for (const key of AUTH_KEYS) {
    if (p[key] === undefined || p[key] === null) {
      // The secret methods keep their plain "required" (what people already grep for).
      if (keys.required.includes(key)) v.problem(`${at}.${key}`, needs);
    } else if (!keys.required.includes(key) && !keys.optional.includes(key)) {
      v.problem(`${at}.${key}`, `not used with clientAuth ${clientAuth}`);
    }
  }
  const has = (key: AuthKey): boolean => p[key] !== undefined && p[key] !== null;
  const use = (key: AuthKey): boolean => has(key) && (keys.required.includes(key) || keys.optional.includes(key));

  let tokenUrl: string | undefined;
  let clientId: SecretValue | undefined;
  let clientSecret: SecretValue | undefined;
  let privateKey: SecretValue | undefined;
  let certificate: SecretValue | undefined;
  let keyId: string | undefined;
  let assertion: AssertionConfig | undefined;
  let tokenFile: string | undefined;
  let managedIdentity: ManagedIdentityConfig | undefined;
  let resource = resourceIn;

  if (use('tokenUrl')) tokenUrl = v.string(p.tokenUrl, `${at}.tokenUrl`, { required: true });
  if (use('clientId')) clientId = v.secret(p.clientId, `${at}.clientId`);
  if (use('clientSecret')) {
    clientSecret = v.secret(p.clientSecret, `${at}.clientSecret`);
    warnIfLiteral(v, `${at}.clientSecret`, p.clientSecret);
  }
  if (use('privateKey')) {
    privateKey = v.secret(p.privateKey, `${at}.privateKey`);
    warnIfLiteral(v, `${at}.privateKey`, p.privateKey);
  }
  if (use('certificate')) certificate = v.secret(p.certificate, `${at}.certificate`);
  if (use('keyId')) keyId = v.string(p.keyId, `${at}.keyId`, { required: true });
  if (clientAuth === 'private_key_jwt') {
    const a = v.object(p.assertion, `${at}.assertion`, ['algorithm', 'audience', 'lifetimeSeconds']);
    const algorithm = a?.algorithm === undefined
      ? undefined
      : v.oneOf<AssertionAlgorithm>(a.algorithm, `${at}.assertion.algorithm`, ASSERTION_ALGORITHMS, 'RS256');
    assertion = {
      algorithm,
      audience: v.string(a?.audience, `${at}.assertion.audience`),
      lifetimeSeconds: v.number(a?.lifetimeSeconds, `${at}.assertion.lifetimeSeconds`, {
        default: DEFAULT_ASSERTION_LIFETIME_SECONDS, min: 10, max: 3600, integer: true,
      }),
    };
    if (privateKey !== undefined) checkKeys(v, at, clientAuth, privateKey, certificate, algorithm);
  }
  if (clientAuth === 'tls_client_auth' && privateKey !== undefined && certificate !== undefined) {
    checkKeys(v, at, clientAuth, privateKey, certificate, undefined);
  }

  if (clientAuth === 'workload_identity') {
    // The Azure Workload Identity webhook injects these into every labelled pod.
    const file = has('tokenFile') ? v.string(p.tokenFile, `${at}.tokenFile`, { required: true }) : env.AZURE_FEDERATED_TOKEN_FILE;
    const from = has('tokenFile') ? '' : ' (from AZURE_FEDERATED_TOKEN_FILE)';
    if (file === undefined || file === '') {
      if (!has('tokenFile')) v.problem(`${at}.tokenFile`, `${needs} (or set AZURE_FEDERATED_TOKEN_FILE)`);
    } else {
      tokenFile = isAbsolute(file) ? file : resolve(baseDir, file);
      try {
        if (readFileSync(tokenFile, 'utf8').trim() === '') v.problem(`${at}.tokenFile`, `${tokenFile}${from} is empty`);
      } catch (err) {
        v.problem(`${at}.tokenFile`, `cannot read ${tokenFile}${from} (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
      }
    }
    if (!has('clientId')) {
      const id = env.AZURE_CLIENT_ID;
      if (id === undefined || id === '') v.problem(`${at}.clientId`, `${needs} (or set AZURE_CLIENT_ID)`);
      else clientId = { read: () => id };
    }
    if (!has('tokenUrl')) {
      const host = env.AZURE_AUTHORITY_HOST;
      const tenant = env.AZURE_TENANT_ID;
      if (!host || !tenant) v.problem(`${at}.tokenUrl`, `${needs} (or set AZURE_AUTHORITY_HOST and AZURE_TENANT_ID)`);
      else tokenUrl = `${host.endsWith('/') ? host : `${host}/`}${tenant}/oauth2/v2.0/token`;
    }
  }

  if (clientAuth === 'managed_identity') {
    const chosen = (['clientId', 'objectId', 'resourceId'] as const).filter(has);
    if (chosen.length > 1) v.problem(`${at}.${chosen[1]}`, `a user-assigned identity is named by one of clientId, objectId, resourceId (${chosen.join(' and ')} are set)`);
    // One resource per request: a scope beside it would be silently dropped.
    if (resource !== undefined && scope !== undefined) v.problem(`${at}.scope`, 'not used with resource (managed_identity asks for one resource)');
    if (resource === undefined) {
      // Entra v1 resources, as IMDS takes them; a v2 scope "<resource>/.default" names the same.
      if (scope === undefined) v.problem(`${at}.resource`, `${needs} (or a scope ending in /.default)`);
      else if (!scope.endsWith('/.default') || scope.includes(' ')) v.problem(`${at}.scope`, 'managed_identity asks for one resource: write resource, or one scope ending in /.default');
      else resource = scope.slice(0, -'/.default'.length);
    }
    let kind: ManagedIdentityConfig['kind'] = 'imds';
    let url = IMDS_TOKEN_URL;
    let identityHeader: SecretValue | undefined;
    // identityEndpoint, when written, wins over what the platform sets.
    if (has('identityEndpoint')) {
      const endpoint = v.string(p.identityEndpoint, `${at}.identityEndpoint`, { required: true });
      if (endpoint !== undefined) {
        v.url(endpoint, `${at}.identityEndpoint`);
        // The IMDS address alone means its token path.
        url = URL.canParse(endpoint) && new URL(endpoint).pathname === '/' ? `${new URL(endpoint).origin}/metadata/identity/oauth2/token` : endpoint;
      }
    } else if (env.IDENTITY_ENDPOINT && env.IDENTITY_HEADER) {
      // App Service, Functions and Container Apps set both.
      kind = 'app_service';
      url = env.IDENTITY_ENDPOINT;
      const header = env.IDENTITY_HEADER;
      identityHeader = { read: () => header };
      v.url(url, `${at}.clientAuth (IDENTITY_ENDPOINT)`);
    } else if (env.IDENTITY_ENDPOINT && env.IMDS_ENDPOINT) {
      // An Azure Arc-enabled server sets these two and no IDENTITY_HEADER; its endpoint answers
      // with a challenge only a local administrator or the himds group can meet (Microsoft,
      // "Authenticate against Azure resources with Azure Arc-enabled servers").
      kind = 'arc';
      url = env.IDENTITY_ENDPOINT;
      v.url(url, `${at}.clientAuth (IDENTITY_ENDPOINT)`);
      if (chosen.length > 0) v.problem(`${at}.${chosen[0]}`, 'an Azure Arc-enabled server has only its system-assigned identity');
    } else if (env.IDENTITY_ENDPOINT) {
      // Neither App Service nor Arc: asking IMDS instead would hide the misconfiguration.
      v.problem(`${at}.clientAuth`, 'IDENTITY_ENDPOINT is set without IDENTITY_HEADER (App Service, Container Apps) or IMDS_ENDPOINT (Azure Arc): set both of one pair, or identityEndpoint');
    }
    managedIdentity = {
      kind,
      url,
      identityHeader,
      ...(kind === 'arc' ? { arcKeyDir: arcKeyDir ?? arcTokensFolder(env) } : {}),
      clientId: has('clientId') ? v.string(p.clientId, `${at}.clientId`, { required: true }) : undefined,
      objectId: has('objectId') ? v.string(p.objectId, `${at}.objectId`, { required: true }) : undefined,
      resourceId: has('resourceId') ? v.string(p.resourceId, `${at}.resourceId`, { required: true }) : undefined,
    };
  }

  let tls: ProfileConfig['tls'];
  if (use('tls')) {
    const t = v.object(p.tls, `${at}.tls`, ['ca']);
    const ca = v.secret(t?.ca, `${at}.tls.ca`);
    if (ca !== undefined) checkCa(v, `${at}.tls.ca`, ca);
    tls = { ca };
  }

  if (tokenUrl !== undefined && tokenUrl !== '') {
    v.url(tokenUrl, `${at}.tokenUrl`);
    if (URL.canParse(tokenUrl)) {
      const u = new URL(tokenUrl);
      if (u.protocol === 'http:' && !isLoopback(u.hostname)) {
        v.warning(`${at}.tokenUrl`, `plain http to ${u.host}: the client credentials and the token cross the network unencrypted`);
      }
      if (clientAuth === 'tls_client_auth' && u.protocol !== 'https:') v.problem(`${at}.tokenUrl`, 'tls_client_auth needs an https tokenUrl');
    }
  }

  return {
    clientAuth,
    tokenUrl: tokenUrl ?? '',
    clientId: clientId ?? emptySecret,
    clientSecret: clientSecret ?? emptySecret,
    privateKey,
    certificate,
    keyId,
    assertion,
    tokenFile,
    managedIdentity,
    tls,
    resource,
  };
}

/** Where the Connected Machine agent writes its challenge key files (Microsoft's Arc document). */
function arcTokensFolder(env: NodeJS.ProcessEnv): string {
  if (process.platform === 'win32') return join(env.ProgramData ?? 'C:\\ProgramData', 'AzureConnectedMachineAgent', 'Tokens');
  return '/var/opt/azcmagent/tokens';
}

/** Parses the key (and certificate) now, so a broken or mismatched pair fails at start. */
function checkKeys(
  v: Validator,
  at: string,
  clientAuth: ClientAuth,
  privateKey: SecretValue,
  certificate: SecretValue | undefined,
  algorithm: AssertionAlgorithm | undefined,
): void {
  let key;
  try {
    key = loadPrivateKey(privateKey.read());
  } catch (err) {
    v.problem(`${at}.privateKey`, (err as Error).message);
    return;
  }
  if (clientAuth === 'private_key_jwt') {
    const alg = algorithm ?? defaultAlgorithm(key);
    if (alg === undefined) v.problem(`${at}.privateKey`, `${key.asymmetricKeyType ?? 'this'} keys cannot sign an assertion; use an RSA or EC (P-256, P-384, P-521) key`);
    else {
      const mismatch = algorithmMismatch(alg, key);
      if (mismatch !== undefined) v.problem(algorithm === undefined ? `${at}.privateKey` : `${at}.assertion.algorithm`, mismatch);
    }
  }
  if (certificate === undefined) return;
  let cert;
  try {
    cert = loadCertificate(certificate.read());
  } catch (err) {
    v.problem(`${at}.certificate`, (err as Error).message);
    return;
  }
  if (!keyMatchesCertificate(key, cert)) {
    v.problem(`${at}.certificate`, `does not match privateKey (the certificate is for ${cert.subject.replace(/\n/g, ', ')})`);
    return;
  }
  const facts = certificateFacts(cert);
  if (Date.parse(facts.notAfter) < Date.now()) v.warning(`${at}.certificate`, `expired at ${facts.notAfter}`);
}

function checkCa(v: Validator, path: string, ca: SecretValue): void {
  const pems = pemCertificates(ca.read());
  if (pems.length === 0) {
    v.problem(path, 'holds no PEM certificate (-----BEGIN CERTIFICATE-----)');
    return;
  }
  pems.forEach((pem, i) => {
    try {
      loadCertificate(pem);
    } catch {
      v.problem(path, `certificate ${i + 1} of ${pems.length} is not a valid X.509 certificate`);
    }
  });
}

/** A value written into the file as it is, with no ${file:} or ${VAR}: the file now holds a secret. */
function warnIfLiteral(v: Validator, path: string, raw: unknown): void {
  if (typeof raw === 'string' && raw !== '' && !raw.includes('${')) {
    v.warning(path, 'a secret written into the config file; use ${file:PATH} (a mounted Secret) or ${VAR}');
  }
}

export function isLoopback(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase();
  return h === 'localhost' || h.endsWith('.localhost') || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h);
}
