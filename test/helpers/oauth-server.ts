// A real OAuth2 authorization server for tests: panva's oidc-provider on 127.0.0.1, port 0,
// issuing RS256 JWT access tokens (typ at+jwt) with the client-credentials grant.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import { exportJWK, generateKeyPair, createRemoteJWKSet, jwtVerify, type JWTPayload } from 'jose';
import Provider, { errors } from 'oidc-provider';

export interface TestClient {
  clientId: string;
  clientSecret: string;
  authMethod: 'client_secret_post' | 'client_secret_basic';
}

export interface OAuthServer {
  issuer: string;
  tokenUrl: string;
  jwksUri: string;
  /** Clients registered: `post` (client_secret_post) and `basic` (client_secret_basic). */
  clients: { post: TestClient; basic: TestClient };
  /** Every request to the token endpoint, in order (form fields parsed, secrets included: tests only). */
  tokenRequests: Array<{ form: URLSearchParams; authorization: string | undefined }>;
  /** Verifies an access token against the server's published keys; returns its claims. */
  verify(token: string, audience?: string): Promise<JWTPayload>;
  /**
   * Replace the next token-endpoint answers with a hand-made one (status, headers, body), or
   * `'hang'` to never answer. Each call consumes one; `undefined` goes back to the real server.
   */
  override(...answers: Array<Override | undefined>): void;
  close(): Promise<void>;
}

/** 'hang': never answer; { status, … }: answer this instead; { delayMs }: the real answer, late. */
export type Override = 'hang' | { status: number; headers?: Record<string, string>; body: string } | { delayMs: number };

export const DEFAULT_RESOURCE = 'https://upstream.test';
export const SCOPES = 'api://orders/.default orders.read';

export async function startOAuthServer(options: { ttlSeconds?: number } = {}): Promise<OAuthServer> {
  const ttl = options.ttlSeconds ?? 300;
  const { privateKey } = await generateKeyPair('RS256', { extractable: true });
  const jwk = { ...(await exportJWK(privateKey)), alg: 'RS256', use: 'sig', kid: 'test-key' };
  const clients = {
    post: { clientId: 'orders-post', clientSecret: 'post-secret-Zx9!', authMethod: 'client_secret_post' as const },
    basic: { clientId: 'orders:basic', clientSecret: 'basic s3cret+/=%:&', authMethod: 'client_secret_basic' as const },
  };

  const server: Server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const issuer = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;

  const provider = new Provider(issuer, {
    clients: Object.values(clients).map((c) => ({
      client_id: c.clientId,
      client_secret: c.clientSecret,
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      token_endpoint_auth_method: c.authMethod,
      scope: SCOPES,
    })),
    jwks: { keys: [jwk] },
    scopes: SCOPES.split(' '),
    ttl: { ClientCredentials: (_ctx: unknown, token: { resourceServer?: { accessTokenTTL?: number } }) => token.resourceServer?.accessTokenTTL ?? ttl },
    features: {
      clientCredentials: { enabled: true },
      devInteractions: { enabled: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => DEFAULT_RESOURCE,
        useGrantedResource: () => true,
        getResourceServerInfo: (_ctx: unknown, resource: string) => {
          if (!/^https:\/\/[a-z0-9.-]+\.test\/?$/.test(resource)) throw new errors.InvalidTarget();
          return { scope: SCOPES, audience: resource, accessTokenFormat: 'jwt', accessTokenTTL: ttl, jwt: { sign: { alg: 'RS256' } } };
        },
      },
    },
  } as any);
  provider.on('server_error', (_ctx: unknown, err: Error) => {
    process.stderr.write(`oidc-provider server_error: ${err.stack}\n`);
  });
  const callback = provider.callback();

  const tokenRequests: OAuthServer['tokenRequests'] = [];
  const overrides: Array<Override | undefined> = [];
  const hanging = new Set<ServerResponse>();

  server.on('request', (req: IncomingMessage, res: ServerResponse) => {
    if (req.method !== 'POST' || !req.url?.startsWith('/token')) return void callback(req, res);
    // Read the form once, record it, then replay it to the provider (or answer ourselves).
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const raw = Buffer.concat(chunks);
      tokenRequests.push({ form: new URLSearchParams(raw.toString('utf8')), authorization: req.headers.authorization });
      const answer = overrides.length > 0 ? overrides.shift() : undefined;
      if (answer === 'hang') {
        hanging.add(res);
        res.on('close', () => hanging.delete(res));
        return;
      }
      if (answer !== undefined && 'delayMs' in answer) {
        setTimeout(() => replay(raw), answer.delayMs);
        return;
      }
      if (answer !== undefined) {
        res.writeHead(answer.status, answer.headers ?? {});
        res.end(answer.body);
        return;
      }
      replay(raw);
    });
    function replay(raw: Buffer): void {
      const copy = Object.assign(Readable.from([raw]), {
        headers: req.headers, method: req.method, url: req.url, socket: req.socket, connection: req.socket,
        httpVersion: req.httpVersion, httpVersionMajor: req.httpVersionMajor, httpVersionMinor: req.httpVersionMinor,
        rawHeaders: req.rawHeaders,
      });
      void callback(copy as unknown as IncomingMessage, res);
    }
  });

  const jwks = createRemoteJWKSet(new URL(`${issuer}/jwks`));
  return {
    issuer,
    tokenUrl: `${issuer}/token`,
    jwksUri: `${issuer}/jwks`,
    clients,
    tokenRequests,
    async verify(token, audience = DEFAULT_RESOURCE) {
      const { payload } = await jwtVerify(token, jwks, { issuer, audience, typ: 'at+jwt' });
      return payload;
    },
    override(...answers) {
      overrides.push(...answers);
    },
    async close() {
      for (const res of hanging) res.destroy();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
