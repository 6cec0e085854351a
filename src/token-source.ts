// One request to a token endpoint: the client-credentials grant (RFC 6749 §4.4) with whatever
// the profile's client-authentication method adds (client-auth/), and the answer turned into
// a Token or a coded TokenFetchError (token-response.ts). No caching here; the only retries
// are the ones a method's endpoint documents within one fetch (managed identity).
import { setTimeout as sleep } from 'node:timers/promises';
import { request, type Dispatcher } from 'undici';
import { clientAuthMethods, type ClientAuthMethod, type Credentials } from './client-auth/index.ts';
import { readSecret } from './client-auth/read.ts';
import { systemClock, type Clock } from './clock.ts';
import type { ProfileConfig } from './config.ts';
import { ClientAuthError, TokenEndpointError, TokenFetchError, TokenNetworkError, TokenResponseError, TokenTimeoutError } from './errors.ts';
import type { Token } from './token.ts';
import { TokenConnection } from './token-connection.ts';
import { endpointError, MAX_BODY_BYTES, parseTokenResponse, readCapped } from './token-response.ts';

export interface TokenSourceOptions {
  /** undici dispatcher for the token endpoint when the profile needs no CA, client certificate or proxy. */
  dispatcher?: Dispatcher;
  /** Stamps obtainedAt/expiresAt and resolves an HTTP-date Retry-After. */
  clock?: Clock;
  /** Hears what each fetch's method sent, in the safe form `token` prints (no secret). */
  onCredentials?: (details: Record<string, unknown>) => void;
}

interface HttpCall {
  method: 'GET' | 'POST';
  headers: Record<string, string>;
  body?: string;
}

export class TokenSource {
  readonly #profile: ProfileConfig;
  readonly #method: ClientAuthMethod;
  readonly #connection: TokenConnection;
  readonly #clock: Clock;
  readonly #onCredentials: ((details: Record<string, unknown>) => void) | undefined;

  constructor(profile: ProfileConfig, options: TokenSourceOptions = {}) {
    this.#profile = profile;
    this.#method = clientAuthMethods[profile.clientAuth];
    this.#connection = new TokenConnection(profile.proxy, options.dispatcher);
    this.#clock = options.clock ?? systemClock;
    this.#onCredentials = options.onCredentials;
  }

  /** Asks the endpoint for one token. Rejects only with a TokenFetchError subclass. */
  async fetch(): Promise<Token> {
    const profile = this.#profile;
    let credentials: Credentials;
    try {
      credentials = await this.#method.credentials(profile, this.#clock.now());
    } catch (err) {
      if (err instanceof TokenFetchError) throw err;
      // jose or node:crypto refusing to sign: say so by code, never with the key.
      throw new ClientAuthError(`profile ${profile.name}: cannot build the ${profile.clientAuth} credentials (${(err as { code?: string }).code ?? (err as Error).name})`, { cause: err });
    }
    this.#onCredentials?.(credentials.details);
    const exchange = credentials.exchange;
    const ca = profile.tls?.ca === undefined ? undefined : readSecret(profile, profile.tls.ca, 'tls.ca');
    const dispatcher = this.#connection.dispatcher({ ca, client: credentials.tlsClient, direct: exchange?.direct });

    let url: string;
    let options: HttpCall;
    if (exchange === undefined) {
      const form = new URLSearchParams({ grant_type: 'client_credentials' });
      if (profile.scope !== undefined) form.set('scope', profile.scope);
      if (profile.resource !== undefined) form.set('resource', profile.resource);
      if (profile.audience !== undefined) form.set('audience', profile.audience);
      for (const [key, value] of Object.entries(profile.extraParams)) form.set(key, value);
      for (const [key, value] of Object.entries(credentials.form)) form.set(key, value);
      url = profile.tokenUrl;
      options = {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json', ...credentials.headers },
        body: form.toString(),
      };
    } else {
      url = exchange.url;
      options = { method: exchange.method, headers: credentials.headers };
    }

    // Real timers, not the injected clock: this bounds real I/O (connect, headers, the whole
    // body, and the waits between a method's retries), and a frozen test clock never fires.
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), profile.timeoutMs);
    try {
      // Azure Arc's challenge is met once; a second 401 is the endpoint's error.
      let challenge = exchange?.challenge;
      for (let attempt = 0; ;) {
        const answer = await this.#ask(url, options, dispatcher, controller.signal, credentials.secrets, exchange?.adaptBody, challenge !== undefined);
        if ('wwwAuthenticate' in answer) {
          const reply = challenge!(answer.wwwAuthenticate);
          // Pushed into the list #ask masks with, before anything can echo it.
          credentials.secrets.push(...reply.secrets);
          options = { ...options, headers: { ...options.headers, ...reply.headers } };
          challenge = undefined;
          continue;
        }
        if (answer instanceof TokenEndpointError && exchange !== undefined && exchange.retryStatuses(answer.status)) {
          const delay = exchange.retryDelaysMs[attempt++];
          if (delay !== undefined) {
            await sleep(Math.max(delay, (answer.retryAfterSeconds ?? 0) * 1000), undefined, { signal: controller.signal }).catch(() => undefined);
            if (!controller.signal.aborted) continue;
          }
        }
        if (answer instanceof TokenFetchError) throw answer;
        return answer;
      }
    } catch (err) {
      if (err instanceof TokenEndpointError || err instanceof TokenResponseError) throw err;
      if (controller.signal.aborted) throw new TokenTimeoutError(profile.timeoutMs, { cause: err });
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * One HTTP exchange; a non-2xx answer comes back as a TokenEndpointError (not thrown) so it can
   * be retried, and, when `challengeable`, a 401 with a challenge comes back as that challenge.
   */
  async #ask(
    url: string,
    options: HttpCall,
    dispatcher: Dispatcher,
    signal: AbortSignal,
    secrets: string[],
    adaptBody: ((text: string, now: number) => string) | undefined,
    challengeable: boolean,
  ): Promise<Token | TokenEndpointError | { wwwAuthenticate: string }> {
    let res: Dispatcher.ResponseData | undefined;
    try {
      res = await request(url, { dispatcher, ...options, signal });
      const body = await readCapped(res.body, MAX_BODY_BYTES);
      const answeredAt = this.#clock.now();
      const wwwAuthenticate = res.headers['www-authenticate'];
      if (res.statusCode === 401 && challengeable && typeof wwwAuthenticate === 'string') return { wwwAuthenticate };
      if (res.statusCode < 200 || res.statusCode > 299) return endpointError(res.statusCode, res.headers, body, answeredAt, secrets);
      const adapted = adaptBody === undefined || body.truncated ? body : { ...body, text: adaptBody(body.text, answeredAt) };
      return parseTokenResponse(res.statusCode, res.headers, adapted, answeredAt, secrets);
    } catch (err) {
      if (err instanceof TokenFetchError || signal.aborted) throw err;
      // The undici error goes along as the cause: it names sockets and codes, never our headers.
      const code = (err as { code?: unknown } | null)?.code;
      const why = typeof code === 'string' ? code : (err as Error | null)?.name ?? 'error';
      throw new TokenNetworkError(`cannot reach the token endpoint ${new URL(url).origin} (${why})`, { cause: err });
    } finally {
      // Whatever happened, release the socket: an unread body would pin the connection.
      if (res !== undefined && !res.body.readableEnded) res.body.destroy();
    }
  }

  /** Closes connections this source opened for itself (a CA, a client certificate or a proxy). */
  close(): Promise<void> {
    return this.#connection.close();
  }
}
