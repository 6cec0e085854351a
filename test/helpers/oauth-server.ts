// A real OAuth2 authorization server for tests: panva's oidc-provider on 127.0.0.1, port 0,
// issuing RS256 JWT access tokens (typ at+jwt) with the client-credentials grant.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { TLSSocket } from 'node:tls';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import { exportJWK, generateKeyPair, createLocalJWKSet, createRemoteJWKSet, jwtVerify, type JWTPayload } from 'jose';
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
  /**
   * Every request to the token endpoint, in order (form fields parsed, secrets included: tests
   * only); over TLS, the subject of the client certificate presented, if any.
   */
  tokenRequests: Array<{ form: URLSearchParams; authorization: string | undefined; clientCertificate?: string | undefined }>;
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

export interface OAuthServerOptions {
  ttlSeconds?: number;
  /** Serve HTTPS with this key and certificate; `clientCa` (PEM) verifies client certificates. */
  tls?: { key: string; cert: string; clientCa?: string };
  /** More clients, as oidc-provider client metadata (e.g. private_key_jwt with `jwks`, tls_client_auth). */
  clients?: Array<Record<string, unknown>>;
  /** oidc-provider's features.mTLS: tls_client_auth and certificate-bound access tokens (RFC 8705). */
  mtls?: boolean;
}

export async function startOAuthServer(options: OAuthServerOptions = {}): Promise<OAuthServer> {
  const ttl = options.ttlSeconds ?? 300;
  const { privateKey } = await generateKeyPair('RS256', { extractable: true });
  const jwk = { ...(await exportJWK(privateKey)), alg: 'RS256', use: 'sig', kid: 'test-key' };
  const clients = {
    post: { clientId: 'orders-post', clientSecret: 'post-secret-Zx9!', authMethod: 'client_secret_post' as const },
    basic: { clientId: 'orders:basic', clientSecret: 'basic s3cret+/=%:&', authMethod: 'client_secret_basic' as const },
  };

  const server: Server = options.tls === undefined
    ? createServer()
    // Asks for a client certificate but lets oidc-provider decide (certificateAuthorized below).
    : createHttpsServer({ key: options.tls.key, cert: options.tls.cert, ca: options.tls.clientCa, requestCert: true, rejectUnauthorized: false });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const issuer = `${options.tls === undefined ? 'http' : 'https'}://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const peer = (socket: unknown) => (socket as Partial<TLSSocket>).getPeerX509Certificate?.();

  const provider = new Provider(issuer, {
    clients: [
      ...Object.values(clients).map((c) => ({
        client_id: c.clientId,
        client_secret: c.clientSecret,
        grant_types: ['client_credentials'],
        redirect_uris: [],
        response_types: [],
        token_endpoint_auth_method: c.authMethod,
        scope: SCOPES,
      })),
      ...(options.clients ?? []).map((c) => ({ grant_types: ['client_credentials'], redirect_uris: [], response_types: [], scope: SCOPES, ...c })),
    ],
    jwks: { keys: [jwk] },
    ...(options.mtls === true && {
      clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt', 'none', 'tls_client_auth'],
    }),
    scopes: SCOPES.split(' '),
    ttl: { ClientCredentials: (_ctx: unknown, token: { resourceServer?: { accessTokenTTL?: number } }) => token.resourceServer?.accessTokenTTL ?? ttl },
    features: {
      clientCredentials: { enabled: true },
      ...(options.mtls === true && {
        mTLS: {
          enabled: true,
          tlsClientAuth: true,
          certificateBoundAccessTokens: true,
          getCertificate: (ctx: { req: IncomingMessage }) => peer(ctx.req.socket)?.toString(),
          certificateAuthorized: (ctx: { req: IncomingMessage }) => (ctx.req.socket as TLSSocket).authorized === true,
          certificateSubjectMatches: (ctx: { req: IncomingMessage }, property: string, expected: string) =>
            property === 'tls_client_auth_subject_dn' && peer(ctx.req.socket)?.subject === expected,
        },
      }),
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
      tokenRequests.push({
        form: new URLSearchParams(raw.toString('utf8')),
        authorization: req.headers.authorization,
        ...(options.tls !== undefined && { clientCertificate: peer(req.socket)?.subject }),
      });
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

  // Over TLS with a test CA, global fetch would not trust the server: verify with its own keys.
  const { d: _d, p: _p, q: _q, dp: _dp, dq: _dq, qi: _qi, ...publicJwk } = jwk;
  const jwks = options.tls === undefined ? createRemoteJWKSet(new URL(`${issuer}/jwks`)) : createLocalJWKSet({ keys: [publicJwk] });
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
