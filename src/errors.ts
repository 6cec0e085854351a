// Every failure the sidecar reports carries a stable `code` (greppable in logs, asserted in
// tests) and keeps its `cause`. Messages never contain a secret, a token or a subscription key.

export class ExtProcError extends Error {
  readonly code: string;

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ExtProcError';
    this.code = code;
  }
}

export interface ConfigProblem {
  path: string;
  message: string;
}

/** The config file is unusable; `problems` lists every one, by its path in the file. */
export class ConfigError extends ExtProcError {
  readonly problems: readonly ConfigProblem[];

  constructor(problems: readonly ConfigProblem[]) {
    super('OAUTH2_ERR_CONFIG', problems.map((p) => `${p.path}: ${p.message}`).join('\n'));
    this.name = 'ConfigError';
    this.problems = problems;
  }
}

/** Base for everything that can go wrong while asking a token endpoint for a token. */
export class TokenFetchError extends ExtProcError {
  /** Seconds the endpoint asked us to wait (Retry-After on 429/503), if it said. */
  readonly retryAfterSeconds: number | undefined;

  constructor(code: string, message: string, options?: { cause?: unknown; retryAfterSeconds?: number }) {
    super(code, message, options);
    this.name = 'TokenFetchError';
    this.retryAfterSeconds = options?.retryAfterSeconds;
  }
}

/** No answer: DNS, refused connection, TLS, reset. */
export class TokenNetworkError extends TokenFetchError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('OAUTH2_ERR_TOKEN_NETWORK', message, options);
    this.name = 'TokenNetworkError';
  }
}

/** No complete answer within the configured timeout. */
export class TokenTimeoutError extends TokenFetchError {
  constructor(timeoutMs: number, options?: { cause?: unknown }) {
    super('OAUTH2_ERR_TOKEN_TIMEOUT', `token endpoint did not answer within ${timeoutMs} ms`, options);
    this.name = 'TokenTimeoutError';
  }
}

/** A non-2xx status, with the OAuth2 error body (RFC 6749 §5.2) when there is one. */
export class TokenEndpointError extends TokenFetchError {
  readonly status: number;
  readonly oauthError: string | undefined;
  readonly oauthErrorDescription: string | undefined;

  constructor(
    status: number,
    details: { error?: string; errorDescription?: string; retryAfterSeconds?: number; bodyShape?: string },
  ) {
    // bodyShape: the type and size of a body that is not an OAuth2 error (e.g. an HTML page from
    // a proxy), so the log says what answered; never its text (it may echo our request).
    const what = details.error === undefined
      ? details.bodyShape === undefined ? 'no OAuth2 error body' : `no OAuth2 error body; ${details.bodyShape}`
      : details.errorDescription === undefined
        ? `error=${details.error}`
        : `error=${details.error}: ${details.errorDescription}`;
    super('OAUTH2_ERR_TOKEN_STATUS', `token endpoint answered HTTP ${status} (${what})`, {
      retryAfterSeconds: details.retryAfterSeconds,
    });
    this.name = 'TokenEndpointError';
    this.status = status;
    this.oauthError = details.error;
    this.oauthErrorDescription = details.errorDescription;
  }
}

/** A 2xx answer that is not a usable token response (not JSON, no access_token, bad expires_in). */
export class TokenResponseError extends TokenFetchError {
  /** Set when a 2xx body nevertheless carries an OAuth2 `error` (some IdPs answer 200 with one). */
  readonly oauthError: string | undefined;
  readonly oauthErrorDescription: string | undefined;

  constructor(message: string, options?: { cause?: unknown; oauthError?: string; oauthErrorDescription?: string }) {
    super('OAUTH2_ERR_TOKEN_RESPONSE', message, options);
    this.name = 'TokenResponseError';
    this.oauthError = options?.oauthError;
    this.oauthErrorDescription = options?.oauthErrorDescription;
  }
}

/** A secret (e.g. `${file:…}`) could not be read at fetch time. */
export class SecretReadError extends TokenFetchError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('OAUTH2_ERR_SECRET', message, options);
    this.name = 'SecretReadError';
  }
}

/** The credentials could not be built from what was read (signing refused by jose or node:crypto). */
export class ClientAuthError extends TokenFetchError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('OAUTH2_ERR_CLIENT_AUTH', message, options);
    this.name = 'ClientAuthError';
  }
}

/**
 * What Envoy is told when a stream cannot get credentials. One table, so the status, the
 * stable code in the JSON body and the `details` Envoy logs stay consistent.
 */
export const denyReasons = {
  noToken: { code: 'OAUTH2_ERR_NO_TOKEN', message: 'no usable access token for this profile' },
  unknownProfile: { code: 'OAUTH2_ERR_UNKNOWN_PROFILE', message: 'the stream names a profile that is not configured' },
  internal: { code: 'OAUTH2_ERR_INTERNAL', message: 'the credential processor failed' },
} as const;

export type DenyReason = keyof typeof denyReasons;

/** Keep only what is safe to log from an unknown thrown value. */
export function describeError(err: unknown): { code: string; message: string } {
  if (err instanceof ExtProcError) return { code: err.code, message: err.message };
  if (err instanceof Error) return { code: 'OAUTH2_ERR_UNEXPECTED', message: err.message };
  return { code: 'OAUTH2_ERR_UNEXPECTED', message: String(err) };
}
