// One profile's token: fetched at start, refreshed in the background ahead of expiry, one fetch
// at a time, retried with backoff, and never handed out past its expiry minus the margin.
import { systemClock, type Clock, type Timer } from './clock.ts';
import type { ProfileConfig, RefreshConfig } from './config.ts';
import { TokenEndpointError, TokenFetchError, TokenResponseError, describeError } from './errors.ts';
import type { Logger } from './logger.ts';
import type { Metrics } from './metrics.ts';
import { authorizationValue, type Token } from './token.ts';
import { MAX_LIFETIME_SECONDS } from './token-response.ts';

/** An endpoint's Retry-After is honoured up to this; beyond it, it is more likely a mistake. */
const MAX_RETRY_AFTER_SECONDS = 3600;
// setTimeout fires at once (with a warning) for delays above 2^31-1 ms (~24.8 days), and a
// long-lived token can be refreshed later than that: long waits are taken in steps.
const MAX_TIMER_MS = 2 ** 31 - 1;
/** Background refreshes are at least this far apart, whatever lifetime the endpoint claims. */
const MIN_REFRESH_MS = 1000;

export type TokenListener = (token: Token | undefined) => void;

export interface TokenCacheOptions {
  profile: ProfileConfig;
  source: { fetch(): Promise<Token> };
  logger: Logger;
  metrics: Metrics;
  clock?: Clock;
  /** [0, 1), for refresh and backoff jitter; Math.random by default. */
  random?: () => number;
}

export class TokenCache {
  readonly #profile: ProfileConfig;
  readonly #source: { fetch(): Promise<Token> };
  readonly #logger: Logger;
  readonly #metrics: Metrics;
  readonly #clock: Clock;
  readonly #random: () => number;
  readonly #listeners = new Set<TokenListener>();
  readonly #fetchEndListeners = new Set<(error: TokenFetchError | undefined) => void>();

  #token: Token | undefined;
  /** current() hands out #token while the clock is before this (ms since the epoch). */
  #usableUntil = 0;
  #inFlight: Promise<Token | undefined> | undefined;
  /** The next fetch: the background refresh, or the retry after a failure. */
  #fetchTimer: Timer | undefined;
  /** When the held token stops being usable, so listeners hear `undefined` at that moment. */
  #expiryTimer: Timer | undefined;
  #failures = 0;
  /** After a failure, refresh() does not fetch before this: the backoff and Retry-After hold. */
  #retryNotBefore = 0;
  #started = false;
  #stopped = false;
  /** A fetch has ended (with a token or not) since start(). */
  #tried = false;
  #lastError: TokenFetchError | undefined;
  /** A backend's refusal (refresh.onBackendStatus) starts no fetch before this. */
  #rejectionNotBefore = 0;

  constructor(options: TokenCacheOptions) {
    this.#profile = options.profile;
    this.#source = options.source;
    this.#logger = options.logger;
    this.#metrics = options.metrics;
    this.#clock = options.clock ?? systemClock;
    this.#random = options.random ?? Math.random;
    // Every series at zero from the start, so `increase(...) > 0` sees the first failure.
    this.#metrics.declareProfile(this.#profile.name);
  }

  /** Whether the first fetch has ended, with a token or an error: fail-open readiness waits for it. */
  get tried(): boolean {
    return this.#tried;
  }

  /** The error of the last fetch, until a fetch succeeds. */
  get lastError(): TokenFetchError | undefined {
    return this.#lastError;
  }

  /** Fetches the first token now; the cache keeps itself fresh from then on. Idempotent. */
  start(): void {
    if (this.#started || this.#stopped) return;
    this.#started = true;
    void this.#fetch();
  }

  /** Until when (ms since the epoch) current() hands out the held token; 0 when there is none. */
  get usableUntil(): number {
    return this.#token === undefined ? 0 : this.#usableUntil;
  }

  /** The token to inject, or undefined when none is usable. Hot path: one comparison. */
  current(): Token | undefined {
    return this.#clock.now() < this.#usableUntil ? this.#token : undefined;
  }

  /**
   * Fetches now and resolves with the token then usable (the new one, or the old one if the
   * fetch failed: see lastError). Joins a fetch already in flight. While backing off after a
   * failure it does not fetch (that is what protects a struggling endpoint from callers that
   * refresh on demand) and resolves with current(). Never rejects.
   */
  refresh(): Promise<Token | undefined> {
    if (this.#stopped) return Promise.resolve(this.current());
    if (this.#inFlight !== undefined) return this.#inFlight;
    if (this.#clock.now() < this.#retryNotBefore) return Promise.resolve(this.current());
    return this.#fetch();
  }

  /**
   * A backend answered a request that carried `token` with one of refresh.onBackendStatus: fetch
   * a new token now, single flight, at most once per minBackoffSeconds, so a backend that refuses
   * every token cannot make the sidecar hammer the IdP. The refused token is replaced when the
   * new one arrives, not withdrawn before: denying requests in the meantime would not help them,
   * and readiness would flap with every 401. Returns whether a fetch was started (or joined).
   */
  rejected(token: Token, status: number): boolean {
    if (this.#stopped || token !== this.#token) return false; // already replaced
    const now = this.#clock.now();
    if (now < this.#rejectionNotBefore) return false;
    this.#rejectionNotBefore = now + this.#profile.refresh.minBackoffSeconds * 1000;
    this.#logger.info({ profile: this.#profile.name, status }, 'the backend refused the token: fetching a new one');
    void this.refresh();
    return true;
  }

  /**
   * Cancels every timer; a fetch still in flight is ignored when it ends. current() keeps
   * answering with the held token until its usable end, for the streams still draining.
   */
  stop(): void {
    this.#stopped = true;
    this.#cancel(this.#fetchTimer);
    this.#cancel(this.#expiryTimer);
    this.#fetchTimer = undefined;
    this.#expiryTimer = undefined;
    this.#listeners.clear();
    this.#fetchEndListeners.clear();
  }

  /** Called after each fetch ends: with its error, or undefined once its token is handed out. */
  onFetchEnd(listener: (error: TokenFetchError | undefined) => void): () => void {
    this.#fetchEndListeners.add(listener);
    return () => this.#fetchEndListeners.delete(listener);
  }

  /** Called with each new token, and with undefined when the held one stops being usable. */
  onChange(listener: TokenListener): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** The refresh and retry timers land here; a fetch already in flight covers them. */
  #due(): void {
    if (this.#inFlight === undefined) void this.#fetch();
  }

  #fetch(): Promise<Token | undefined> {
    this.#started = true;
    this.#cancel(this.#fetchTimer);
    this.#fetchTimer = undefined;
    const attempt = this.#attempt();
    this.#inFlight = attempt;
    return attempt;
  }

  async #attempt(): Promise<Token | undefined> {
    const started = this.#clock.now();
    let token: Token;
    try {
      token = await fetchFrom(this.#source);
    } catch (err) {
      this.#inFlight = undefined;
      if (!this.#stopped) {
        this.#tried = true;
        this.#failed(asFetchError(err), started);
      }
      return this.current();
    }
    // Cleared before listeners run, so one that calls refresh() starts a new fetch.
    this.#inFlight = undefined;
    if (this.#stopped) return this.current();
    this.#tried = true;
    const checked = sane(token, this.#profile.maxTokenBytes);
    if (checked instanceof TokenResponseError) {
      this.#failed(checked, started);
      return this.current();
    }
    token = checked;
    const usableUntil = usableEnd(token, this.#profile.refresh);
    if (usableUntil <= this.#clock.now()) {
      const lifetime = (token.expiresAt - token.obtainedAt) / 1000;
      this.#failed(new TokenResponseError(`the token was past its usable end on arrival (lifetime ${lifetime} s)`), started);
      return this.current();
    }
    this.#succeeded(token, usableUntil, started);
    return token;
  }

  #succeeded(token: Token, usableUntil: number, started: number): void {
    const now = this.#clock.now();
    const { name } = this.#profile;
    this.#token = token;
    this.#usableUntil = usableUntil;
    this.#failures = 0;
    this.#retryNotBefore = 0;
    this.#lastError = undefined;

    const refreshAt = refreshMoment(token, usableUntil, now, this.#profile, this.#random());
    this.#fetchTimer = this.#at(refreshAt, () => this.#due());
    this.#cancel(this.#expiryTimer);
    this.#expiryTimer = this.#at(usableUntil, () => this.#expired(token));

    // Whatever happens while counting and logging, every listener (readiness, gRPC health, the
    // workers) hears of the token the cache now hands out: they must never disagree.
    try {
      this.#metrics.tokenFetches.inc({ profile: name, result: 'success', code: '' });
      this.#metrics.tokenFetchSeconds.observe({ profile: name }, (now - started) / 1000);
      this.#logger.info({
        profile: name,
        outcome: 'success',
        durationMs: now - started,
        expiresInSeconds: seconds(token.expiresAt - token.obtainedAt),
        expiresAt: new Date(token.expiresAt).toISOString(),
        refreshInSeconds: seconds(refreshAt - now),
      }, 'token fetched');
    } finally {
      this.#notify(token);
      this.#fetchEnded(undefined);
    }
  }

  #failed(err: TokenFetchError, started: number): void {
    const now = this.#clock.now();
    const { name, refresh } = this.#profile;
    this.#lastError = err;
    this.#failures += 1;
    let delay = backoffMs(this.#failures, refresh, this.#random());
    // Retry-After is honoured even past the held token's usable end: retrying sooner would only
    // earn another 429/503 and, with some IdPs, a longer throttle.
    if (err.retryAfterSeconds !== undefined) {
      delay = Math.max(delay, Math.min(err.retryAfterSeconds, MAX_RETRY_AFTER_SECONDS) * 1000);
    }
    this.#retryNotBefore = now + delay;
    this.#fetchTimer = this.#at(now + delay, () => this.#due());

    this.#metrics.tokenFetches.inc({ profile: name, result: 'error', code: err.code });
    this.#metrics.tokenFetchSeconds.observe({ profile: name }, (now - started) / 1000);
    const held = this.current();
    const oauth = err instanceof TokenEndpointError || err instanceof TokenResponseError ? err : undefined;
    this.#logger.warn({
      profile: name,
      outcome: 'error',
      code: err.code,
      status: err instanceof TokenEndpointError ? err.status : undefined,
      oauthError: oauth?.oauthError,
      oauthErrorDescription: oauth?.oauthErrorDescription,
      // Messages of TokenFetchErrors are built to carry no secret (see token-source.ts).
      reason: err.message,
      durationMs: now - started,
      retryInSeconds: seconds(delay),
      tokenValidForSeconds: held === undefined ? undefined : seconds(this.#usableUntil - now),
    }, 'token fetch failed');
    this.#fetchEnded(err);
  }

  #expired(token: Token): void {
    this.#expiryTimer = undefined;
    if (this.#token !== token) return;
    this.#token = undefined;
    this.#logger.warn({
      profile: this.#profile.name,
      code: this.#lastError?.code,
    }, 'no usable token: the last one reached its expiry margin');
    this.#notify(undefined);
  }

  #fetchEnded(error: TokenFetchError | undefined): void {
    this.#callEach(this.#fetchEndListeners, error);
  }

  #notify(token: Token | undefined): void {
    this.#callEach(this.#listeners, token);
  }

  #callEach<T>(listeners: Iterable<(value: T) => void>, value: T): void {
    for (const listener of [...listeners]) {
      try {
        listener(value);
      } catch (err) {
        // A listener's bug must not stop the others or the refresh cycle.
        this.#logger.error({ profile: this.#profile.name, error: describeError(err) }, 'token listener failed');
      }
    }
  }

  /**
   * Runs fn at `at` (ms since the epoch) on the injected clock. Timers are unref'd: the servers
   * keep the process alive while it serves, and a cache alone (a CLI run, a test that forgot
   * stop()) must never be what holds it open.
   */
  #at(at: number, fn: () => void): Timer {
    const wait = Math.max(0, at - this.#clock.now());
    const timer = this.#clock.setTimeout(() => {
      if (this.#stopped) return;
      if (this.#clock.now() < at) {
        // A capped wait, or a timer a hair early: wait for the rest.
        const rest = this.#at(at, fn);
        if (this.#fetchTimer === timer) this.#fetchTimer = rest;
        if (this.#expiryTimer === timer) this.#expiryTimer = rest;
        return;
      }
      fn();
    }, Math.min(wait, MAX_TIMER_MS));
    timer.unref();
    return timer;
  }

  #cancel(timer: Timer | undefined): void {
    if (timer !== undefined) this.#clock.clearTimeout(timer);
  }
}

/**
 * Until when a token may be handed out. Normally expiry minus the margin; but a margin that
 * would eat more than half of a short-lived token's lifetime is cut to half of it, so such a
 * token is used for the first half of its life rather than never.
 */
function usableEnd(token: Token, refresh: RefreshConfig): number {
  const lifetime = token.expiresAt - token.obtainedAt;
  return token.obtainedAt + Math.max(lifetime - refresh.marginSeconds * 1000, lifetime / 2);
}

/** When to fetch the next token (ms since the epoch). */
function refreshMoment(token: Token, usableUntil: number, now: number, profile: ProfileConfig, random: number): number {
  const { share, jitter } = profile.refresh;
  const lifetime = token.expiresAt - token.obtainedAt;
  // The IdP's refresh_in (Entra) is its own schedule; otherwise share × lifetime, spread by
  // ±jitter × lifetime so that replicas started together do not refresh together.
  let at = token.refreshInSeconds !== undefined
    ? token.obtainedAt + token.refreshInSeconds * 1000
    : token.obtainedAt + lifetime * (share + jitter * (2 * random - 1));
  // Start early enough for one full fetch to end before the token stops being usable.
  at = Math.min(at, usableUntil - Math.min(profile.timeoutMs, (usableUntil - token.obtainedAt) / 2));
  // A token with an absurdly short life must not turn into a fetch loop.
  return Math.max(at, now + MIN_REFRESH_MS);
}

/**
 * Delay before retry number `failures` (1 for the first): the ceiling doubles from
 * minBackoffSeconds up to maxBackoffSeconds, and the delay is drawn between half the ceiling
 * ("equal jitter", so retries spread out but never bunch up near zero) and the ceiling, and
 * never below minBackoffSeconds.
 */
function backoffMs(failures: number, refresh: RefreshConfig, random: number): number {
  const min = refresh.minBackoffSeconds * 1000;
  const ceiling = Math.min(refresh.maxBackoffSeconds * 1000, min * 2 ** Math.min(failures - 1, 30));
  const floor = Math.min(ceiling, Math.max(min, ceiling / 2));
  return Math.round(floor + random * (ceiling - floor));
}

/**
 * Calls the source so that even a synchronous throw arrives as a rejection: #attempt then always
 * resumes after #fetch has recorded it as the fetch in flight.
 */
async function fetchFrom(source: { fetch(): Promise<Token> }): Promise<Token> {
  return source.fetch();
}

function asFetchError(err: unknown): TokenFetchError {
  if (err instanceof TokenFetchError) return err;
  // Not ours, so its message is not known to be free of secrets: name the kind only.
  const kind = err instanceof Error ? err.name : typeof err;
  return new TokenFetchError('OAUTH2_ERR_UNEXPECTED', `the token source failed unexpectedly (${kind})`, { cause: err });
}

/**
 * What any token source hands over is checked before it is used: a finite expiry (capped at
 * MAX_LIFETIME_SECONDS, so no date arithmetic can overflow), and a header value
 * `<token_type> <access_token>` no larger than maxTokenBytes (Envoy refuses the whole request
 * when the mutated headers pass its max_request_headers_kb, so such a token would fail every
 * request while readiness said ready).
 */
function sane(token: Token, maxTokenBytes: number): Token | TokenResponseError {
  const { obtainedAt, expiresAt } = token;
  if (!Number.isFinite(obtainedAt) || !Number.isFinite(expiresAt) || expiresAt <= obtainedAt) {
    return new TokenResponseError('the token has no valid lifetime');
  }
  const bytes = Buffer.byteLength(authorizationValue(token));
  if (bytes > maxTokenBytes) {
    return new TokenResponseError(`the token is ${bytes} bytes as a header value, more than maxTokenBytes (${maxTokenBytes}): Envoy would refuse requests carrying it`);
  }
  const capped = Math.min(expiresAt, obtainedAt + MAX_LIFETIME_SECONDS * 1000);
  // A refresh_in past the token's own end says nothing: the share of the lifetime decides then.
  const refresh = token.refreshInSeconds;
  const refreshOk = refresh !== undefined && Number.isFinite(refresh) && refresh > 0 && obtainedAt + refresh * 1000 < capped;
  return { ...token, expiresAt: capped, refreshInSeconds: refreshOk ? refresh : undefined };
}

/** Milliseconds to seconds, to the millisecond. */
function seconds(ms: number): number {
  return Math.round(ms) / 1000;
}
