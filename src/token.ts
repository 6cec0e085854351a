// The value that flows from the token source through the cache to the header mutation.

export interface Token {
  /** The access token. Never logged, never put in an error message or a metric. */
  readonly accessToken: string;
  /** As sent by the endpoint, e.g. "Bearer"; the `authorization` value is `${tokenType} ${accessToken}`. */
  readonly tokenType: string;
  /** When the endpoint answered, ms since the epoch (injected clock). */
  readonly obtainedAt: number;
  /** obtainedAt + expires_in, ms since the epoch. */
  readonly expiresAt: number;
  /** Entra's `refresh_in` (seconds after obtainedAt), when the endpoint sent one. */
  readonly refreshInSeconds: number | undefined;
}

/** The header value that carries the token: `${tokenType} ${accessToken}`, e.g. "Bearer eyJ…". */
export function authorizationValue(token: Token): string {
  return `${token.tokenType} ${token.accessToken}`;
}
