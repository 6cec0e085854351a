// Prometheus metrics on a registry of our own (never prom-client's global one), so tests and
// several servers in one process do not share counters. Labels never carry a secret or a token:
// only profile names (from the config) and fixed outcome words.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export type RequestOutcome = 'injected' | 'denied' | 'allowed_without_token' | 'unknown_profile';

/** Requests answered, counted by the handler in plain integers: profile → outcome → count. */
export type RequestCounts = () => Iterable<readonly [profile: string, outcome: RequestOutcome, count: number]>;
export type FetchResult = 'success' | 'error';

/** Outcomes a configured profile's requests can have (unknown_profile is counted by name). */
const PROFILE_OUTCOMES: readonly RequestOutcome[] = ['injected', 'denied', 'allowed_without_token'];
/**
 * The codes a token fetch fails with (errors.ts), each series created at zero for every profile.
 * A code not listed here is still counted, from its first occurrence.
 */
const FETCH_ERROR_CODES = [
  'OAUTH2_ERR_TOKEN_NETWORK', 'OAUTH2_ERR_TOKEN_TIMEOUT', 'OAUTH2_ERR_TOKEN_STATUS', 'OAUTH2_ERR_TOKEN_RESPONSE',
  'OAUTH2_ERR_SECRET', 'OAUTH2_ERR_CLIENT_AUTH', 'OAUTH2_ERR_UNEXPECTED',
] as const;

/** The worker pool as /metrics sees it (server.workers above 1). */
export interface WorkerCounts {
  serving(): number;
  restarts(): number;
}

export class Metrics {
  readonly registry: Registry;
  readonly requests: Counter<'profile' | 'outcome'>;
  readonly tokenFetches: Counter<'profile' | 'result' | 'code'>;
  readonly tokenFetchSeconds: Histogram<'profile'>;
  readonly tokenExpirySeconds: Gauge<'profile'>;
  readonly openStreams: Gauge;
  // Read when scraped (see observeOpenStreams, observeRequests, observeTokenExpiry).
  private readonly sources = {
    openStreams: (): number => 0,
    requests: (() => []) as RequestCounts,
    checks: (() => []) as RequestCounts,
    profiles: new Set<string>(),
    expiry: new Map<string, () => number | undefined>(),
  };

  constructor(options: { registry?: Registry; defaultMetrics?: boolean } = {}) {
    const sources = this.sources;
    this.registry = options.registry ?? new Registry();
    const registers = [this.registry];
    if (options.defaultMetrics ?? true) collectDefaultMetrics({ register: this.registry, prefix: 'oauth2_extproc_' });
    this.requests = new Counter({
      name: 'oauth2_extproc_requests_total',
      help: 'Requests answered (ext_proc request_headers messages and ext_authz checks), by profile and outcome',
      labelNames: ['profile', 'outcome'],
      registers,
      // Counted per message in plain integers by the handler (see observeRequests), copied here
      // when scraped: prom-client's label lookup cost 0.19 µs per request in a CPU profile,
      // more than half of the handler's own 0.32 µs.
      collect() {
        this.reset();
        // Every configured profile × outcome exists at zero from the start (also in a primary
        // whose workers count the requests: the sum over processes is the same), so that
        // `increase(...{outcome="denied"}[5m]) > 0` sees the first denials after a restart.
        for (const profile of sources.profiles) for (const outcome of PROFILE_OUTCOMES) this.inc({ profile, outcome }, 0);
        for (const [profile, outcome, count] of sources.requests()) this.inc({ profile, outcome }, count);
        for (const [profile, outcome, count] of sources.checks()) this.inc({ profile, outcome }, count);
      },
    });
    this.tokenFetches = new Counter({
      name: 'oauth2_extproc_token_fetches_total',
      help: 'Token endpoint requests, by profile and result (code is the error code, "" on success)',
      labelNames: ['profile', 'result', 'code'],
      registers,
    });
    this.tokenFetchSeconds = new Histogram({
      name: 'oauth2_extproc_token_fetch_duration_seconds',
      help: 'Token endpoint request latency',
      labelNames: ['profile'],
      buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20],
      registers,
    });
    this.tokenExpirySeconds = new Gauge({
      name: 'oauth2_extproc_token_expiry_seconds',
      help: 'Seconds until the cached token of a profile expires (absent: no token)',
      labelNames: ['profile'],
      registers,
      collect() {
        this.reset();
        for (const [profile, source] of sources.expiry) {
          const seconds = source();
          if (seconds !== undefined) this.set({ profile }, Math.round(seconds));
        }
      },
    });
    this.openStreams = new Gauge({
      name: 'oauth2_extproc_open_streams',
      help: 'ext_proc streams currently open',
      registers,
      collect() {
        this.set(sources.openStreams());
      },
    });

  }

  /**
   * A configured profile: its request, fetch and latency series exist at zero from now on,
   * rather than appearing at their first use (an alert on their increase would miss it).
   */
  declareProfile(profile: string): void {
    this.sources.profiles.add(profile);
    this.tokenFetches.inc({ profile, result: 'success', code: '' }, 0);
    for (const code of FETCH_ERROR_CODES) this.tokenFetches.inc({ profile, result: 'error', code }, 0);
    this.tokenFetchSeconds.zero({ profile });
  }

  /** server.workers above 1: how many serve, and how often one was started again. */
  observeWorkers(source: WorkerCounts): void {
    const registers = [this.registry];
    new Gauge({
      name: 'oauth2_extproc_workers_serving',
      help: 'Worker processes listening on the ext_proc port',
      registers,
      collect() {
        this.set(source.serving());
      },
    });
    new Counter({
      name: 'oauth2_extproc_worker_restarts_total',
      help: 'Worker processes started again after one exited',
      registers,
      collect() {
        this.reset();
        this.inc(source.restarts());
      },
    });
  }

  /** Open streams are read from the handler when scraped, not counted through prom-client. */
  observeOpenStreams(source: () => number): void {
    this.sources.openStreams = source;
  }

  /** Request counts are read from the handler when scraped (counted from zero by it). */
  observeRequests(source: RequestCounts): void {
    this.sources.requests = source;
  }

  /** ext_authz checks answered, read from its service when scraped, counted with the requests. */
  observeChecks(source: RequestCounts): void {
    this.sources.checks = source;
  }

  /** Seconds to expiry of a profile's token, read when scraped; undefined = no token. */
  observeTokenExpiry(profile: string, source: () => number | undefined): void {
    this.sources.expiry.set(profile, source);
  }
}
