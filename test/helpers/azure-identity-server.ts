// Azure's managed-identity token endpoints, for tests. No open-source IMDS exists, so this is
// modelled on Microsoft's documents, answer for answer:
// - IMDS: "How to use managed identities for Azure resources on an Azure VM to acquire an access
//   token" and "Azure Instance Metadata Service" (learn.microsoft.com): GET
//   /metadata/identity/oauth2/token?api-version=2018-02-01&resource=…[&client_id|object_id|msi_res_id],
//   header `Metadata: true` required, requests carrying X-Forwarded-For refused, every number in
//   the answer a string (expires_in, expires_on, not_before), 400 invalid_request for a missing
//   header, resource or unknown identity; 404/410 while IMDS updates, 429 when throttled, 5xx.
// - App Service / Functions / Container Apps: "How to use managed identities for App Service and
//   Azure Functions", REST protocol: GET $IDENTITY_ENDPOINT?resource=…&api-version=2019-08-01
//   [&client_id|principal_id|mi_res_id], header X-IDENTITY-HEADER = $IDENTITY_HEADER; the answer
//   has expires_on (epoch seconds as a string; a date such as "11/24/2026 10:00:00 +00:00" on
//   older versions) and no expires_in.
// - Azure Arc-enabled servers: "Authenticate against Azure resources with Azure Arc-enabled
//   servers": the agent sets IDENTITY_ENDPOINT (http://localhost:40342/metadata/identity/oauth2/token)
//   and IMDS_ENDPOINT (http://localhost:40342), no IDENTITY_HEADER; GET $IDENTITY_ENDPOINT
//   ?api-version=2020-06-01&resource=…, header `Metadata: true`. Without an Authorization header
//   the answer is 401 with `WWW-Authenticate: Basic realm=<tokens folder>/<id>.key`, a file the
//   agent has just written (/var/opt/azcmagent/tokens on Linux, readable by root and the himds
//   group; here a temporary folder); the client repeats the request with
//   `Authorization: Basic <file contents>` and gets an IMDS-style answer. System-assigned only.
//   A served Arc endpoint on its own port, as the agent's is.
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { SignJWT } from 'jose';

export const IMDS_PATH = '/metadata/identity/oauth2/token';
export const APP_SERVICE_PATH = '/msi/token';

export interface AzureIdentityServer {
  /** The origin, for `identityEndpoint` (IMDS). */
  origin: string;
  /** IDENTITY_ENDPOINT for the App Service flavour. */
  appServiceEndpoint: string;
  /** IDENTITY_HEADER for the App Service flavour. */
  identityHeader: string;
  /** The user-assigned identity this "VM" carries (by client id, object id and resource id). */
  userAssigned: { clientId: string; objectId: string; resourceId: string };
  requests: Array<{ path: string; query: URLSearchParams; headers: IncomingMessage['headers'] }>;
  /** Access tokens issued, in order (tests only). */
  issued: string[];
  /** The next answers are these statuses (IMDS's documented transient ones), then real answers again. */
  fail(...statuses: number[]): void;
  /** Azure Arc: IDENTITY_ENDPOINT, IMDS_ENDPOINT, and the tokens folder its key files are written in. */
  arcEndpoint: string;
  arcImdsEndpoint: string;
  arcKeyDir: string;
  /** Arc's behaviour for tests: a realm naming another file; a 400 that echoes the Authorization it got. */
  arc: { realm: string | undefined; echoAuthorization: boolean };
  /** How App Service writes expires_on: epoch seconds (2019-08-01) or a date (older versions). */
  expiresOnFormat: 'epoch' | 'date';
  close(): Promise<void>;
}

const TTL_SECONDS = 3600;

export async function startAzureIdentityServer(): Promise<AzureIdentityServer> {
  const signingKey = randomBytes(32);
  const requests: AzureIdentityServer['requests'] = [];
  const issued: string[] = [];
  const failures: number[] = [];
  const identityHeader = randomBytes(16).toString('hex');
  const userAssigned = {
    clientId: '5e29463d-71da-4fe0-8e69-999b57db23b0',
    objectId: 'c0ffee00-0000-4000-8000-000000000001',
    resourceId: '/subscriptions/0000/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/orders',
  };

  const state = { expiresOnFormat: 'epoch' as 'epoch' | 'date' };
  const server: Server = createServer((req, res) => void answer(req, res, false));
  const arcServer: Server = createServer((req, res) => void answer(req, res, true));
  const arcKeyDir = mkdtempSync(join(tmpdir(), 'azcmagent-tokens-'));
  const arcKeys = new Set<string>();
  const arc = { realm: undefined as string | undefined, echoAuthorization: false };

  async function answer(req: IncomingMessage, res: ServerResponse, isArc: boolean): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://x');
    requests.push({ path: url.pathname, query: url.searchParams, headers: req.headers });
    const send = (status: number, body: unknown): void => {
      res.writeHead(status, { 'content-type': 'application/json; charset=utf-8' });
      res.end(JSON.stringify(body));
    };
    const failure = failures.shift();
    if (failure !== undefined) {
      return send(failure, { error: 'temporarily_unavailable', error_description: `IMDS test double answering ${failure}` });
    }
    const appService = !isArc && url.pathname === APP_SERVICE_PATH;
    if (req.method !== 'GET' || (!appService && url.pathname !== IMDS_PATH)) return send(404, { error: 'not_found' });
    if (isArc) {
      if (req.headers.metadata !== 'true') return send(400, { error: 'invalid_request', error_description: 'Required metadata header not specified' });
      if (!['2019-11-01', '2020-06-01'].includes(url.searchParams.get('api-version') ?? '')) return send(400, { error: 'invalid_request', error_description: 'Invalid api-version' });
      if (['client_id', 'object_id', 'msi_res_id'].some((k) => url.searchParams.has(k))) {
        return send(400, { error: 'invalid_request', error_description: 'Arc-enabled servers have only a system-assigned identity' });
      }
      const authorization = req.headers.authorization;
      const secret = authorization?.startsWith('Basic ') ? authorization.slice('Basic '.length) : undefined;
      if (secret === undefined || !arcKeys.has(secret)) {
        // A fresh key file per challenge, as the agent writes one.
        const key = randomBytes(32).toString('hex');
        const file = join(arcKeyDir, `${randomUUID()}.key`);
        writeFileSync(file, key, { mode: 0o640 });
        arcKeys.add(key);
        res.writeHead(401, { 'content-type': 'application/json; charset=utf-8', 'www-authenticate': `Basic realm=${arc.realm ?? file}` });
        res.end(JSON.stringify({ error: 'unauthorized', error_description: 'Unauthorized' }));
        return;
      }
      if (arc.echoAuthorization) return send(400, { error: 'invalid_request', error_description: `bad request with Authorization: ${authorization}` });
    } else if (appService) {
      if (req.headers['x-identity-header'] !== identityHeader) return send(400, { error: 'invalid_request', error_description: 'X-IDENTITY-HEADER missing or wrong' });
      if (url.searchParams.get('api-version') !== '2019-08-01') return send(400, { error: 'invalid_request', error_description: 'api-version' });
    } else {
      if (req.headers['x-forwarded-for'] !== undefined) return send(400, { error: 'invalid_request', error_description: 'Request rejected: X-Forwarded-For' });
      if (req.headers.metadata !== 'true') return send(400, { error: 'invalid_request', error_description: 'Required metadata header not specified' });
      if (url.searchParams.get('api-version') !== '2018-02-01') return send(400, { error: 'invalid_request', error_description: 'Invalid api-version' });
    }
    const resource = url.searchParams.get('resource');
    if (!resource) return send(400, { error: 'invalid_request', error_description: 'Required audience parameter not specified' });
    const asked = {
      clientId: url.searchParams.get('client_id'),
      objectId: url.searchParams.get(appService ? 'principal_id' : 'object_id'),
      resourceId: url.searchParams.get(appService ? 'mi_res_id' : 'msi_res_id'),
    };
    const user = asked.clientId ?? asked.objectId ?? asked.resourceId;
    if (user !== null && user !== userAssigned.clientId && user !== userAssigned.objectId && user !== userAssigned.resourceId) {
      return send(400, { error: 'invalid_request', error_description: 'Identity not found' });
    }
    const now = Math.floor(Date.now() / 1000);
    const oid = user === null ? 'system-assigned-oid' : userAssigned.objectId;
    const token = await new SignJWT({ oid, appid: user === null ? 'system-assigned-app' : userAssigned.clientId })
      .setProtectedHeader({ alg: 'HS256', typ: 'JWT' })
      .setAudience(resource).setIssuer('https://sts.windows.net/test-tenant/').setSubject(oid)
      .setIssuedAt(now).setNotBefore(now).setExpirationTime(now + TTL_SECONDS)
      .sign(signingKey);
    issued.push(token);
    const expiresOn = now + TTL_SECONDS;
    if (appService) {
      return send(200, {
        access_token: token,
        expires_on: state.expiresOnFormat === 'epoch' ? String(expiresOn) : azureDate(expiresOn),
        resource,
        token_type: 'Bearer',
        client_id: user === null ? 'system-assigned-app' : userAssigned.clientId,
      });
    }
    return send(200, {
      access_token: token,
      refresh_token: '',
      expires_in: String(TTL_SECONDS),
      expires_on: String(expiresOn),
      not_before: String(now),
      resource,
      token_type: 'Bearer',
    });
  }

  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  await new Promise<void>((resolve) => arcServer.listen(0, '127.0.0.1', resolve));
  const origin = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const arcOrigin = `http://127.0.0.1:${(arcServer.address() as AddressInfo).port}`;
  return {
    origin,
    appServiceEndpoint: `${origin}${APP_SERVICE_PATH}`,
    identityHeader,
    arcEndpoint: `${arcOrigin}${IMDS_PATH}`,
    arcImdsEndpoint: arcOrigin,
    arcKeyDir,
    arc,
    userAssigned,
    requests,
    issued,
    fail: (...statuses) => void failures.push(...statuses),
    get expiresOnFormat() {
      return state.expiresOnFormat;
    },
    set expiresOnFormat(value) {
      state.expiresOnFormat = value;
    },
    async close() {
      for (const s of [server, arcServer]) {
        s.closeAllConnections();
        await new Promise<void>((resolve) => s.close(() => resolve()));
      }
      rmSync(arcKeyDir, { recursive: true, force: true });
    },
  };
}

/** "11/24/2026 10:00:00 +00:00", as App Service's older api-versions write expires_on. */
export function azureDate(epochSeconds: number): string {
  const d = new Date(epochSeconds * 1000);
  const two = (n: number): string => String(n).padStart(2, '0');
  return `${two(d.getUTCMonth() + 1)}/${two(d.getUTCDate())}/${d.getUTCFullYear()} ${two(d.getUTCHours())}:${two(d.getUTCMinutes())}:${two(d.getUTCSeconds())} +00:00`;
}
