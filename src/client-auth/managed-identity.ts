// managed_identity: Azure issues the token itself, to whatever runs on the VM or in the app.
// Two endpoints, as Microsoft documents them:
// - IMDS (VMs, VM scale sets, AKS nodes): GET http://169.254.169.254/metadata/identity/oauth2/token
//   ?api-version=2018-02-01&resource=…, header `Metadata: true` (learn.microsoft.com, "How to use
//   managed identities for Azure resources on an Azure VM to acquire an access token");
// - App Service, Functions, Container Apps: GET $IDENTITY_ENDPOINT?api-version=2019-08-01&resource=…,
//   header `X-IDENTITY-HEADER: $IDENTITY_HEADER` ("How to use managed identities for App Service").
// Both answer with numbers as strings and an `expires_on` that is epoch seconds or, on older
// hosts, a date; both are host-local, so never through a proxy.
import type { ProfileConfig } from '../config.ts';
import type { ClientAuthMethod, Exchange } from './index.ts';
import { readSecret } from './read.ts';

export const IMDS_TOKEN_URL = 'http://169.254.169.254/metadata/identity/oauth2/token';

// IMDS: 404 and 410 while it is being updated (Microsoft: retry 410 for up to 70 s), 429 when
// throttled, 5xx transient. App Service documents only throttling and transient errors.
const imdsRetry = (status: number): boolean => status === 404 || status === 410 || status === 429 || status >= 500;
const appServiceRetry = (status: number): boolean => status === 429 || status >= 500;
/** Exponential backoff within one fetch; the fetch's timeout cuts it short. */
const RETRY_DELAYS_MS = [1000, 2000, 4000, 8000, 16_000];

export const managedIdentity: ClientAuthMethod = {
  async credentials(profile) {
    const mi = profile.managedIdentity;
    if (mi === undefined) throw new Error(`profile ${profile.name} has no managed identity settings`);
    const appService = mi.kind === 'app_service';
    const url = new URL(mi.url);
    url.searchParams.set('api-version', appService ? '2019-08-01' : '2018-02-01');
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
      retryStatuses: appService ? appServiceRetry : imdsRetry,
      retryDelaysMs: RETRY_DELAYS_MS,
      adaptBody: withExpiresIn,
    };
    return {
      form: {},
      headers,
      secrets,
      details: { endpoint: `${appService ? 'App Service identity endpoint' : 'IMDS'} ${url.origin}${url.pathname}`, identity: identityName(mi) },
      exchange,
    };
  },
};

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
