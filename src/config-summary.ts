// What `check-config` prints of a parsed config: every setting, and of each credential only
// what is safe to show (lengths, key types, certificate subjects and thumbprints, paths).
import { certificateFacts, defaultAlgorithm, loadCertificate, loadPrivateKey } from './client-auth/keys.ts';
import type { Config, ProfileConfig, SecretValue } from './config-types.ts';
import { DEFAULT_ASSERTION_LIFETIME_SECONDS } from './client-auth/private-key-jwt.ts';

/** What `check-config` prints: every setting, no secret. */
export function describeConfig(config: Config): string {
  const lines = [
    `server.grpc: ${config.server.grpc}`,
    `server.admin: ${config.server.admin}`,
    `server.workers: ${config.server.workers}`,
    `logging.level: ${config.logging.level}`,
  ];
  for (const p of Object.values(config.profiles)) {
    lines.push(`profile ${p.name}:`);
    lines.push(...describeClientAuth(p).map((line) => `  ${line}`));
    if (p.scope !== undefined) lines.push(`  scope: ${p.scope}`);
    if (p.resource !== undefined) lines.push(`  resource: ${p.resource}`);
    if (p.audience !== undefined) lines.push(`  audience: ${p.audience}`);
    const extras = Object.keys(p.extraParams);
    if (extras.length > 0) lines.push(`  extraParams: ${extras.join(', ')} (values hidden)`);
    lines.push(`  inject: ${p.header}`);
    lines.push(`  remove: ${p.removeHeaders.join(', ')}`);
    if (p.removeQueryParameters.length > 0) lines.push(`  remove from the query: ${p.removeQueryParameters.join(', ')}`);
    lines.push(`  onFailure: ${p.onFailure}${p.onFailure === 'deny' ? ` (HTTP ${p.failureStatus})` : ''}`);
    lines.push(`  timeoutSeconds: ${p.timeoutMs / 1000}`);
    lines.push(`  refresh: at ${p.refresh.share} of the lifetime (±${p.refresh.jitter}), margin ${p.refresh.marginSeconds}s, backoff ${p.refresh.minBackoffSeconds}s..${p.refresh.maxBackoffSeconds}s`);
    if (p.refresh.onBackendStatus.length > 0) lines.push(`  refresh.onBackendStatus: ${p.refresh.onBackendStatus.join(', ')} (a new token when the backend answers so)`);
  }
  if (config.warnings.length > 0) {
    lines.push(`warnings (${config.warnings.length}):`);
    for (const w of config.warnings) lines.push(`  ${w.path}: ${w.message}`);
  }
  return lines.join('\n');
}

/** How a profile proves who it is, without a secret: lengths, key types, thumbprints, paths. */
function describeClientAuth(p: ProfileConfig): string[] {
  const lines: string[] = [];
  const read = (value: SecretValue): string => {
    try {
      return value.read();
    } catch (err) {
      return `(not readable now: ${(err as NodeJS.ErrnoException).code ?? 'error'})`;
    }
  };
  if (p.clientAuth !== 'managed_identity') lines.push(`tokenUrl: ${p.tokenUrl}`);
  lines.push(`clientAuth: ${p.clientAuth}`);
  switch (p.clientAuth) {
    case 'client_secret_post':
    case 'client_secret_basic':
      lines.push(`clientSecret: (set, ${read(p.clientSecret).length} characters)`);
      break;
    case 'private_key_jwt':
      lines.push(`clientId: ${read(p.clientId)}`, ...describeKeys(p));
      if (p.keyId !== undefined) lines.push(`keyId: ${p.keyId}`);
      lines.push(`assertion: aud ${p.assertion?.audience ?? p.tokenUrl}, lifetime ${p.assertion?.lifetimeSeconds ?? DEFAULT_ASSERTION_LIFETIME_SECONDS}s`);
      break;
    case 'tls_client_auth':
      lines.push(`clientId: ${read(p.clientId)}`, ...describeKeys(p));
      break;
    case 'workload_identity':
      lines.push(`clientId: ${read(p.clientId)}`, `tokenFile: ${p.tokenFile ?? ''} (read at every fetch, contents not shown)`);
      break;
    case 'managed_identity': {
      const mi = p.managedIdentity;
      if (mi !== undefined) {
        const kind = { imds: 'IMDS', app_service: 'App Service (IDENTITY_ENDPOINT, IDENTITY_HEADER)', arc: 'Azure Arc (IDENTITY_ENDPOINT, IMDS_ENDPOINT)' }[mi.kind];
        lines.push(`identity endpoint: ${kind} ${mi.url} (never through a proxy)`);
        if (mi.kind === 'arc') lines.push(`challenge key file: in ${mi.arcKeyDir ?? ''} (contents not shown)`);
        const user = mi.clientId ?? mi.objectId ?? mi.resourceId;
        lines.push(`identity: ${user === undefined ? 'system-assigned' : `user-assigned ${user}`}`);
      }
      break;
    }
  }
  if (p.tls?.ca !== undefined) {
    const count = (read(p.tls.ca).match(/-----BEGIN CERTIFICATE-----/g) ?? []).length;
    lines.push(`tls.ca: ${count} certificate${count === 1 ? '' : 's'}, trusted in addition to the system CAs`);
  }
  if (p.proxy !== undefined) {
    const proxyUrl = p.tokenUrl.startsWith('https:') ? p.proxy.httpsProxy ?? p.proxy.httpProxy : p.proxy.httpProxy;
    lines.push(`proxy: ${proxyUrl === undefined ? 'none for this scheme' : withoutCredentials(proxyUrl)}${p.proxy.noProxy ? ` (NO_PROXY ${p.proxy.noProxy})` : ''}`);
  }
  return lines;
}

function withoutCredentials(url: string): string {
  if (!URL.canParse(url)) return '(set)';
  const u = new URL(url);
  return `${u.protocol}//${u.username ? '***@' : ''}${u.host}`;
}

/** Reads the key and certificate now and says what check-config may show of them: key type, subject, thumbprints. */
function describeKeys(profile: ProfileConfig): string[] {
  const lines: string[] = [];
  try {
    if (profile.privateKey !== undefined) {
      const key = loadPrivateKey(profile.privateKey.read());
      const alg = profile.assertion?.algorithm ?? defaultAlgorithm(key);
      lines.push(`privateKey: ${key.asymmetricKeyType === 'rsa' ? `RSA ${key.asymmetricKeyDetails?.modulusLength ?? '?'} bits` : `EC ${key.asymmetricKeyDetails?.namedCurve ?? '?'}`} (not shown)${profile.clientAuth === 'private_key_jwt' ? `, signs ${alg}` : ''}`);
    }
    if (profile.certificate !== undefined) {
      const f = certificateFacts(loadCertificate(profile.certificate.read()));
      lines.push(`certificate: ${f.subject} (issuer ${f.issuer}, valid until ${f.notAfter})`);
      lines.push(`certificate thumbprints: x5t#S256=${f.x5tS256} x5t=${f.x5t} (SHA-1 ${f.sha1Hex})`);
    }
  } catch (err) {
    lines.push(`keys: not readable now (${(err as Error).message})`);
  }
  return lines;
}
