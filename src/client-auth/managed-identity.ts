// managed_identity: Azure issues the token itself, to whatever runs on the VM or in the app.
// Two endpoints, as Microsoft documents them:
// - IMDS (VMs, VM scale sets, AKS nodes): GET http://169.254.169.254/metadata/identity/oauth2/token
//   ?api-version=2018-02-01&resource=…, header `Metadata: true` (learn.microsoft.com, "How to use
//   managed identities for Azure resources on an Azure VM to acquire an access token");
// - App Service, Functions, Container Apps: GET $IDENTITY_ENDPOINT?api-version=2019-08-01&resource=…,
//   header `X-IDENTITY-HEADER: $IDENTITY_HEADER` ("How to use managed identities for App Service");
// - Azure Arc-enabled servers: GET $IDENTITY_ENDPOINT?api-version=2020-06-01&resource=…, header
//   `Metadata: true`; the first answer is 401 with `WWW-Authenticate: Basic realm=<key file>`, and
//   the request is repeated with `Authorization: Basic <that file's contents>` ("Authenticate
//   against Azure resources with Azure Arc-enabled servers"). Reading the file proves the caller
//   is a local administrator or in the himds group.
// Both answer with numbers as strings and an `expires_on` that is epoch seconds or, on older
// hosts, a date; both are host-local, so never through a proxy.
import { readFileSync, realpathSync, statSync } from 'node:fs';
import { extname, isAbsolute, relative, resolve } from 'node:path';
import type { ProfileConfig } from '../config-types.ts';
import { ClientAuthError, SecretReadError } from '../errors.ts';
import type { ClientAuthMethod, Exchange } from './types.ts';
import { readSecret } from './read.ts';

export const IMDS_TOKEN_URL = 'http://169.254.169.254/metadata/identity/oauth2/token';

// IMDS: 404 and 410 while it is being updated (Microsoft: retry 410 for up to 70 s), 429 when
// throttled, 5xx transient. App Service documents only throttling and transient errors.
const imdsRetry = (status: number): boolean => status === 404 || status === 410 || status === 429 || status >= 500;
// App Service (and Arc, which documents none) retry only throttling and transient errors.
const appServiceRetry = (status: number): boolean => status === 429 || status >= 500;
/** The Azure SDKs refuse larger challenge files; the agent's are a few dozen bytes. */
const ARC_KEY_MAX_BYTES = 4096;
const API_VERSIONS = { imds: '2018-02-01', app_service: '2019-08-01', arc: '2020-06-01' } as const;
const ENDPOINT_NAMES = { imds: 'IMDS', app_service: 'App Service identity endpoint', arc: 'Azure Arc identity endpoint' } as const;
/** Exponential backoff within one fetch; the fetch's timeout cuts it short. */
const RETRY_DELAYS_MS = [1000, 2000, 4000, 8000, 16_000];

export const managedIdentity: ClientAuthMethod = {
  async credentials(profile) {
    const mi = profile.managedIdentity;
    if (mi === undefined) throw new Error(`profile ${profile.name} has no managed identity settings`);
    const appService = mi.kind === 'app_service';
    const url = new URL(mi.url);
    url.searchParams.set('api-version', API_VERSIONS[mi.kind]);
    url.searchParams.set('resource', profile.resource ?? '');
    // A user-assigned identity is chosen by one of these; none means the system-assigned one.
    if (mi.clientId !== undefined) url.searchParams.set('client_id', mi.clientId);
    if (mi.objectId !== undefined) url.searchParams.set(appService ? 'principal_id' : 'object_id', mi.objectId);
    if (mi.resourceId !== undefined) url.searchParams.set(appService ? 'mi_res_id' : 'msi_res_id', mi.resourceId);

    const headers: Record<string, string> = { accept: 'application/json' };
    const secrets: string[] = [];
    if (appService) {
      const header = readSecret(profile, mi.identityHeader, 'IDENTITY_HEADER');
      headers['x-identity-header'] = header;
      secrets.push(header);
    } else {
      headers.metadata = 'true';
    }
    const exchange: Exchange = {
      method: 'GET',
      url: url.toString(),
      direct: true,
      retryStatuses: mi.kind === 'imds' ? imdsRetry : appServiceRetry,
      retryDelaysMs: RETRY_DELAYS_MS,
      adaptBody: withExpiresIn,
      ...(mi.kind === 'arc' ? { challenge: (header: string) => arcChallenge(profile, mi.arcKeyDir ?? '', header) } : {}),
    };
    return {
      form: {},
      headers,
      secrets,
      details: { endpoint: `${ENDPOINT_NAMES[mi.kind]} ${url.origin}${url.pathname}`, identity: identityName(mi) },
      exchange,
    };
  },
};

/**
 * Arc's challenge: the key file it names must be a `.key` file in the agent's tokens folder (an
 * endpoint that names another file is not Arc's, and must not make us send that file's
 * contents); its contents are a secret, masked like the others and never logged.
 */
function arcChallenge(profile: ProfileConfig, keyDir: string, wwwAuthenticate: string): { headers: Record<string, string>; secrets: string[] } {
  const m = /^Basic realm=(.+)$/i.exec(wwwAuthenticate.trim());
  if (m === null) throw new ClientAuthError(`profile ${profile.name}: the Azure Arc identity endpoint answered 401 without a "Basic realm=<key file>" challenge`);
  const file = resolve(m[1]!.replace(/^"(.*)"$/, '$1'));
  const inside = (dir: string, path: string): boolean => {
    const rel = relative(dir, path);
    return rel !== '' && !rel.startsWith('..') && !isAbsolute(rel);
  };
  if (extname(file) !== '.key' || !inside(resolve(keyDir), file)) {
    throw new ClientAuthError(`profile ${profile.name}: the Azure Arc identity endpoint names ${file}, which is not a .key file in ${keyDir}; not sent`);
  }
  let key: string;
  try {
    // A link in the folder must not lead out of it either.
    if (!inside(realpathSync(keyDir), realpathSync(file))) throw new ClientAuthError(`profile ${profile.name}: the Azure Arc key file ${file} leads out of ${keyDir}; not sent`);
    if (statSync(file).size > ARC_KEY_MAX_BYTES) throw new ClientAuthError(`profile ${profile.name}: the Azure Arc key file ${file} is larger than ${ARC_KEY_MAX_BYTES} bytes; not sent`);
    key = readFileSync(file, 'utf8').trim();
  } catch (err) {
    if (err instanceof ClientAuthError) throw err;
    const code = (err as NodeJS.ErrnoException | null)?.code;
    const hint = code === 'EACCES' ? ': run as a local administrator or a member of the himds group' : '';
    throw new SecretReadError(`cannot read the Azure Arc key file ${file} of profile ${profile.name}${code ? ` (${code})` : ''}${hint}`, { cause: err });
  }
  if (key === '') throw new SecretReadError(`the Azure Arc key file ${file} of profile ${profile.name} is empty`);
  return { headers: { authorization: `Basic ${key}` }, secrets: [key] };
}

function identityName(mi: NonNullable<ProfileConfig['managedIdentity']>): string {
  if (mi.clientId !== undefined) return `user-assigned, client_id ${mi.clientId}`;
  if (mi.objectId !== undefined) return `user-assigned, object id ${mi.objectId}`;
  if (mi.resourceId !== undefined) return `user-assigned, ${mi.resourceId}`;
  return 'system-assigned';
}

/** Gives the answer an `expires_in` from `expires_on` when it has none (App Service sends only the latter). */
function withExpiresIn(text: string, now: number): string {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    return text;
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) return text;
  const body = json as Record<string, unknown>;
  if (body.expires_in !== undefined && body.expires_in !== null && body.expires_in !== '') return text;
  const expiresOn = parseExpiresOn(body.expires_on);
  if (expiresOn === undefined) return text;
  return JSON.stringify({ ...body, expires_in: Math.floor(expiresOn - now / 1000) });
}

/** Epoch seconds (a number or a numeric string), or a date as "11/24/2026 10:00:00 +00:00" (with optional AM/PM). */
export function parseExpiresOn(value: unknown): number | undefined {
  if (typeof value === 'number') return Number.isFinite(value) ? value : undefined;
  if (typeof value !== 'string') return undefined;
  const s = value.trim();
  if (/^\d+(\.\d+)?$/.test(s)) return Number(s);
  const m = /^(\d{1,2})\/(\d{1,2})\/(\d{4}) (\d{1,2}):(\d{2}):(\d{2})(?: ?([AP]M))? ?([+-])(\d{2}):?(\d{2})$/i.exec(s);
  if (m === null) return undefined;
  const [, month, day, year, hour, minute, second, ampm, sign, offH, offM] = m;
  let h = Number(hour);
  if (ampm !== undefined) h = (h % 12) + (ampm.toUpperCase() === 'PM' ? 12 : 0);
  const utc = Date.UTC(Number(year), Number(month) - 1, Number(day), h, Number(minute), Number(second));
  const offset = (Number(offH) * 60 + Number(offM)) * (sign === '-' ? -1 : 1) * 60_000;
  const ms = utc - offset;
  return Number.isFinite(ms) ? ms / 1000 : undefined;
}
