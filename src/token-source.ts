// One request to a token endpoint: the client-credentials grant (RFC 6749 §4.4), and the
// answer turned into a Token or a coded TokenFetchError. No caching and no retries here.
import { Agent, request, type Dispatcher } from 'undici';
import { systemClock, type Clock } from './clock.ts';
import type { ProfileConfig } from './config.ts';
import { SecretReadError, TokenEndpointError, TokenNetworkError, TokenResponseError, TokenTimeoutError } from './errors.ts';
import type { Token } from './token.ts';
import { endpointError, MAX_BODY_BYTES, parseTokenResponse, readCapped } from './token-response.ts';

// Token fetches are minutes apart, but a start with several profiles or a run of retries
// reuses the connection. Never the global dispatcher: tests and callers inject their own.
const defaultDispatcher = new Agent({ keepAliveTimeout: 30_000, keepAliveMaxTimeout: 120_000 });

export interface TokenSourceOptions {
  /** undici dispatcher for the token endpoint; a shared keep-alive Agent by default. */
  dispatcher?: Dispatcher;
  /** Stamps obtainedAt/expiresAt and resolves an HTTP-date Retry-After. */
  clock?: Clock;
}

export class TokenSource {
  readonly #profile: ProfileConfig;
  readonly #dispatcher: Dispatcher;
  readonly #clock: Clock;
  readonly #origin: string;

  constructor(profile: ProfileConfig, options: TokenSourceOptions = {}) {
    this.#profile = profile;
    this.#dispatcher = options.dispatcher ?? defaultDispatcher;
    this.#clock = options.clock ?? systemClock;
    // Messages name the endpoint by origin only: a path or query is not ours to repeat.
    this.#origin = new URL(profile.tokenUrl).origin;
  }

  /** Asks the endpoint for one token. Rejects only with a TokenFetchError subclass. */
  async fetch(): Promise<Token> {
    const profile = this.#profile;
    const { clientId, clientSecret } = readCredentials(profile);
    const secrets = [clientSecret, `${formEncode(clientId)}:${formEncode(clientSecret)}`]; // raw values; token-response derives every encoding

    const form = new URLSearchParams({ grant_type: 'client_credentials' });
    if (profile.scope !== undefined) form.set('scope', profile.scope);
    if (profile.resource !== undefined) form.set('resource', profile.resource);
    if (profile.audience !== undefined) form.set('audience', profile.audience);
    for (const [key, value] of Object.entries(profile.extraParams)) form.set(key, value);

    const headers: Record<string, string> = {
      'content-type': 'application/x-www-form-urlencoded',
      accept: 'application/json',
    };
    if (profile.clientAuth === 'client_secret_basic') {
      // RFC 6749 §2.3.1: id and secret are form-encoded (space as '+') before the Basic
      // encoding, so ':' in the id and '%', '+', '&' in the secret survive the round trip.
      const pair = `${formEncode(clientId)}:${formEncode(clientSecret)}`;
      headers.authorization = `Basic ${Buffer.from(pair, 'utf8').toString('base64')}`;
    } else {
      form.set('client_id', clientId);
      form.set('client_secret', clientSecret);
    }

    // Real timers, not the injected clock: this bounds real I/O (connect, headers and the whole
    // body), and a test's frozen clock would otherwise never let it fire.
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), profile.timeoutMs);
    let res: Dispatcher.ResponseData | undefined;
    try {
      res = await request(profile.tokenUrl, {
        dispatcher: this.#dispatcher,
        method: 'POST',
        headers,
        body: form.toString(),
        signal: controller.signal,
      });
      const body = await readCapped(res.body, MAX_BODY_BYTES);
      const answeredAt = this.#clock.now();
      if (res.statusCode < 200 || res.statusCode > 299) {
        throw endpointError(res.statusCode, res.headers, body, answeredAt, secrets);
      }
      return parseTokenResponse(res.statusCode, res.headers, body, answeredAt, secrets);
    } catch (err) {
      if (err instanceof TokenEndpointError || err instanceof TokenResponseError) throw err;
      // The undici error goes along as the cause: it names sockets and codes, never our headers.
      if (controller.signal.aborted) throw new TokenTimeoutError(profile.timeoutMs, { cause: err });
      const code = (err as { code?: unknown } | null)?.code;
      const why = typeof code === 'string' ? code : (err as Error | null)?.name ?? 'error';
      throw new TokenNetworkError(`cannot reach the token endpoint ${this.#origin} (${why})`, { cause: err });
    } finally {
      clearTimeout(timer);
      // Whatever happened, release the socket: an unread body would pin the connection.
      if (res !== undefined && !res.body.readableEnded) res.body.destroy();
    }
  }
}

function readCredentials(profile: ProfileConfig): { clientId: string; clientSecret: string } {
  // Read at every fetch: `${file:}` secrets rotate under us (Kubernetes Secret volumes).
  const read = (value: ProfileConfig['clientId'], what: string): string => {
    let s: string;
    try {
      s = value.read();
    } catch (err) {
      const code = (err as NodeJS.ErrnoException | null)?.code;
      throw new SecretReadError(`cannot read the ${what} of profile ${profile.name}${code ? ` (${code})` : ''}`, { cause: err });
    }
    if (s === '') throw new SecretReadError(`the ${what} of profile ${profile.name} is empty`);
    return s;
  };
  return { clientId: read(profile.clientId, 'client id'), clientSecret: read(profile.clientSecret, 'client secret') };
}

/** application/x-www-form-urlencoded encoding of one value (WHATWG URL, as RFC 6749 Appendix B asks). */
function formEncode(value: string): string {
  return new URLSearchParams([['', value]]).toString().slice(1);
}
