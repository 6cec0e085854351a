// The shape of a parsed config: what config.ts produces and every other module reads. Types
// only (and the list of methods they derive from), so that the parsers, the check-config
// summary and the client-auth methods share them without importing each other.
import type { AssertionAlgorithm } from './client-auth/keys.ts';
import type { ConfigProblem } from './errors.ts';

export const CLIENT_AUTH_METHODS = [
  'client_secret_post', 'client_secret_basic', 'private_key_jwt', 'tls_client_auth', 'workload_identity', 'managed_identity',
] as const;
export type ClientAuth = (typeof CLIENT_AUTH_METHODS)[number];
export type { AssertionAlgorithm };
export type OnFailure = 'deny' | 'allow';
export type LogLevel = 'trace' | 'debug' | 'info' | 'warn' | 'error' | 'fatal' | 'silent';

/** A value that may come from a file and is read again each time it is used (rotated Secrets). */
export interface SecretValue {
  read(): string;
  /** Where the value comes from, safe to show: the file's path or the variable's name, never the value. */
  readonly source?: string | undefined;
}

export interface RefreshConfig {
  /** Refresh when this share of the lifetime has passed, unless the IdP sent `refresh_in`. */
  readonly share: number;
  /** Random spread added to/subtracted from the refresh moment, as a share of the lifetime. */
  readonly jitter: number;
  /** A token is never used within this many seconds of its expiry. */
  readonly marginSeconds: number;
  /** First retry delay after a failed fetch; doubles on each failure, with jitter. */
  readonly minBackoffSeconds: number;
  /** Upper bound of the retry delay. */
  readonly maxBackoffSeconds: number;
  /**
   * Backend statuses that mean "this token was refused" (Kong's and APIM's habit is [401]): the
   * token is replaced at once, at most once per minBackoffSeconds. Needs the route to send
   * response headers to the sidecar.
   */
  readonly onBackendStatus: readonly number[];
}

/** The proxy for token endpoints, from HTTPS_PROXY / HTTP_PROXY / NO_PROXY (either case). */
export interface ProxyConfig {
  readonly httpsProxy: string | undefined;
  readonly httpProxy: string | undefined;
  readonly noProxy: string | undefined;
}

export interface AssertionConfig {
  /** Undefined: RS256 for an RSA key, ES256/384/512 for an EC key. */
  readonly algorithm: AssertionAlgorithm | undefined;
  /** `aud`; the tokenUrl when undefined. */
  readonly audience: string | undefined;
  readonly lifetimeSeconds: number;
}

export interface ManagedIdentityConfig {
  /**
   * IMDS; the App Service / Container Apps endpoint (IDENTITY_ENDPOINT + IDENTITY_HEADER); or
   * an Azure Arc-enabled server's (IDENTITY_ENDPOINT + IMDS_ENDPOINT, a key-file challenge).
   */
  readonly kind: 'imds' | 'app_service' | 'arc';
  /** The endpoint's token URL, without query. */
  readonly url: string;
  readonly identityHeader: SecretValue | undefined;
  /** Arc: the folder its challenge's key file must be in (the agent's tokens folder). */
  readonly arcKeyDir?: string | undefined;
  /** A user-assigned identity, chosen by at most one of these. */
  readonly clientId: string | undefined;
  readonly objectId: string | undefined;
  readonly resourceId: string | undefined;
}

export interface ProfileConfig {
  readonly name: string;
  /** Empty for managed_identity, which asks its own endpoint. */
  readonly tokenUrl: string;
  readonly clientId: SecretValue;
  /** Empty unless clientAuth is client_secret_post or client_secret_basic. */
  readonly clientSecret: SecretValue;
  readonly clientAuth: ClientAuth;
  /** PEM (private_key_jwt, tls_client_auth), read again at each fetch. */
  readonly privateKey?: SecretValue | undefined;
  /** PEM (private_key_jwt: optional, for x5t; tls_client_auth: the client certificate). */
  readonly certificate?: SecretValue | undefined;
  /** `kid` of the assertion's header (private_key_jwt). */
  readonly keyId?: string | undefined;
  readonly assertion?: AssertionConfig | undefined;
  /** Absolute path of the projected token (workload_identity). */
  readonly tokenFile?: string | undefined;
  readonly managedIdentity?: ManagedIdentityConfig | undefined;
  /** CAs trusted for the token endpoint in addition to the system's (PEM, read at each fetch). */
  readonly tls?: { readonly ca: SecretValue | undefined } | undefined;
  /** Set when the environment names a proxy. */
  readonly proxy?: ProxyConfig | undefined;
  readonly scope: string | undefined;
  readonly resource: string | undefined;
  readonly audience: string | undefined;
  /** Extra form parameters sent with every token request. */
  readonly extraParams: Readonly<Record<string, string>>;
  readonly timeoutMs: number;
  /** Largest `<token_type> <access_token>` header value accepted from the endpoint, in bytes. */
  readonly maxTokenBytes: number;
  /** Lower-case name of the header that receives `<token_type> <access_token>`. */
  readonly header: string;
  /** Lower-case names removed from every request: the subscription key plus the configured extras. */
  readonly removeHeaders: readonly string[];
  /** Query parameters removed from `:path` (APIM also takes the key as `?subscription-key=`). */
  readonly removeQueryParameters: readonly string[];
  readonly onFailure: OnFailure;
  /** HTTP status of the deny answer when no token is usable. */
  readonly failureStatus: number;
  readonly refresh: RefreshConfig;
}

export interface ServerConfig {
  /** `host:port` or `unix:/path`. */
  readonly grpc: string;
  /** `host:port` for /healthz, /readyz, /metrics. */
  readonly admin: string;
  /** Seconds in-flight streams get to finish after SIGTERM. */
  readonly shutdownGraceSeconds: number;
  /** Processes serving ext_proc streams; tokens are still fetched once, by the primary. */
  readonly workers: number;
  /** Seconds an ext_proc stream may stay open with nothing to do before it is closed (with an error). */
  readonly streamIdleSeconds: number;
}

export interface Config {
  readonly server: ServerConfig;
  readonly logging: { readonly level: LogLevel };
  readonly profiles: Readonly<Record<string, ProfileConfig>>;
  /** Valid but risky settings, by path: `check-config` prints them, the sidecar logs them at start. */
  readonly warnings: readonly ConfigProblem[];
}
