// `server.workers > 1`: several processes serve ext_proc streams on one shared port (node:cluster),
// while the primary alone fetches tokens and hands each new one to every worker, so the token
// endpoint sees one request per profile per refresh, whatever the number of workers.
import cluster, { type Worker } from 'node:cluster';
import { AggregatorRegistry, type Registry } from 'prom-client';
import { systemClock } from './clock.ts';
import type { Config } from './config.ts';
import { describeError } from './errors.ts';
import { GrpcListener } from './grpc-listener.ts';
import type { Logger } from './logger.ts';
import { Metrics } from './metrics.ts';
import type { Token } from './token.ts';

type MetricsJson = Awaited<ReturnType<Registry['getMetricsAsJSON']>>;

type ToWorker =
  | { t: 'token'; profile: string; token: Token | null; usableUntil: number }
  | { t: 'serving'; ready: boolean }
  | { t: 'metrics'; id: number }
  | { t: 'drain'; graceMs: number };

type ToPrimary =
  | { t: 'hello' }
  | { t: 'listening'; address: string }
  | { t: 'bind-failed'; message: string }
  | { t: 'metrics'; id: number; json: MetricsJson }
  // refresh.onBackendStatus in a worker: the backend refused the token obtained at `obtainedAt`.
  | { t: 'rejected'; profile: string; obtainedAt: number; status: number };

export interface TokenState {
  token: Token | undefined;
  usableUntil: number;
}

/** A worker that crashed is started again after this (doubling per crash in a row, up to the cap). */
const RESPAWN_FIRST_MS = 100;
const RESPAWN_MAX_MS = 30_000;
/** A worker that ran this long before it exited starts its slot's crash count afresh. */
const RESPAWN_STABLE_MS = 60_000;
/** From this many crashes in a row, the log says the worker keeps crashing. */
const CRASH_LOOP = 3;

/** One of the `count` places a worker runs in; a replacement takes over its slot's history. */
interface Slot {
  crashesInARow: number;
  startedAt: number;
  timer: NodeJS.Timeout | undefined;
}

export class WorkerPool {
  readonly configured: number;
  private readonly count: number;
  private readonly logger: Logger;
  private readonly tokens: () => Map<string, TokenState>;
  private readonly onChange: () => void;
  private readonly onRejected: (profile: string, obtainedAt: number, status: number) => void;
  private readonly workers = new Set<Worker>();
  private readonly slots = new Map<Worker, Slot>();
  /** Workers that reported listening and have not exited. */
  private readonly listening = new Set<Worker>();
  private restartCount = 0;
  private ready = false;
  private draining = false;
  private nextMetricsId = 0;
  private readonly pendingMetrics = new Map<number, { left: number; json: MetricsJson[]; done: (json: MetricsJson[]) => void }>();

  constructor(options: {
    count: number;
    logger: Logger;
    tokens: () => Map<string, TokenState>;
    onChange?: () => void;
    /** A worker saw the backend refuse a profile's token (refresh.onBackendStatus). */
    onRejected?: (profile: string, obtainedAt: number, status: number) => void;
  }) {
    this.onRejected = options.onRejected ?? (() => {});
    this.count = options.count;
    this.configured = options.count;
    this.logger = options.logger;
    this.tokens = options.tokens;
    this.onChange = options.onChange ?? (() => {});
  }

  /** Workers listening on the port now (readiness needs one; /readyz and /metrics count them). */
  serving(): number {
    return this.listening.size;
  }

  /** Workers started again after one exited, since start. */
  restarts(): number {
    return this.restartCount;
  }

  /** Forks the workers; resolves with the bound address once every one listens. */
  start(): Promise<string> {
    return new Promise((resolve, reject) => {
      let listening = 0;
      let settled = false;
      /** A bind failure or an early crash rejected start(): nothing is started again. */
      let failed = false;
      const onMessage = (worker: Worker, message: ToPrimary): void => {
        if (message.t === 'rejected') {
          this.onRejected(message.profile, message.obtainedAt, message.status);
        } else if (message.t === 'hello') {
          // A new worker (or a replacement) gets the current tokens and readiness at once.
          for (const [profile, state] of this.tokens()) this.sendToken(worker, profile, state);
          send(worker, { t: 'serving', ready: this.ready });
        } else if (message.t === 'listening') {
          this.listening.add(worker);
          this.logger.info({ pid: worker.process.pid, serving: this.listening.size, configured: this.count }, 'worker listening');
          if (!settled && ++listening === this.count) {
            settled = true;
            resolve(message.address);
          }
          this.onChange();
        } else if (message.t === 'bind-failed' && !settled) {
          settled = true;
          failed = true;
          reject(new Error(message.message));
        } else if (message.t === 'metrics') {
          const pending = this.pendingMetrics.get(message.id);
          if (pending !== undefined) {
            pending.json.push(message.json);
            if (--pending.left === 0) {
              this.pendingMetrics.delete(message.id);
              pending.done(pending.json);
            }
          }
        }
      };
      cluster.on('message', onMessage);
      cluster.on('exit', (worker, code, signal) => {
        this.workers.delete(worker);
        for (const [id, pending] of this.pendingMetrics) {
          if (--pending.left <= 0) {
            this.pendingMetrics.delete(id);
            pending.done(pending.json);
          }
        }
        const wasListening = this.listening.delete(worker);
        const slot = this.slots.get(worker);
        this.slots.delete(worker);
        if (wasListening) this.onChange();
        if (this.draining || failed || slot === undefined) return;
        if (!settled) {
          // A crash before listening: the start fails, it does not loop.
          settled = true;
          failed = true;
          reject(new Error(`a worker exited before it listened (${signal ?? `code ${code}`})`));
          return;
        }
        // A crash right after a crash waits longer each time, so a worker that cannot run does not
        // turn into a fork loop; one that ran for a while is replaced at once.
        slot.crashesInARow = Date.now() - slot.startedAt >= RESPAWN_STABLE_MS ? 1 : slot.crashesInARow + 1;
        const delay = Math.min(RESPAWN_MAX_MS, RESPAWN_FIRST_MS * 2 ** Math.min(slot.crashesInARow - 1, 20));
        const looping = slot.crashesInARow >= CRASH_LOOP;
        this.logger.error({
          pid: worker.process.pid, code, signal, crashesInARow: slot.crashesInARow, restartInSeconds: delay / 1000,
          serving: this.listening.size, configured: this.count,
        }, looping ? 'a worker keeps crashing; starting another after a backoff' : 'a worker exited; starting another');
        slot.timer = setTimeout(() => {
          slot.timer = undefined;
          if (this.draining) return;
          this.restartCount++;
          this.fork(slot);
        }, delay);
        slot.timer.unref();
      });
      for (let i = 0; i < this.count; i++) this.fork({ crashesInARow: 0, startedAt: 0, timer: undefined });
    });
  }

  /** Sends a profile's new token (or its loss) to every worker. */
  broadcastToken(profile: string, state: TokenState): void {
    for (const worker of this.workers) this.sendToken(worker, profile, state);
  }

  setServing(ready: boolean): void {
    this.ready = ready;
    for (const worker of this.workers) send(worker, { t: 'serving', ready });
  }

  /** Every worker's metrics, as prom-client JSON, to aggregate with the primary's. */
  metricsJson(): Promise<MetricsJson[]> {
    const live = [...this.workers].filter((w) => w.isConnected());
    if (live.length === 0) return Promise.resolve([]);
    const id = this.nextMetricsId++;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        const pending = this.pendingMetrics.get(id);
        this.pendingMetrics.delete(id);
        resolve(pending?.json ?? []);
      }, 2000);
      this.pendingMetrics.set(id, { left: live.length, json: [], done: (json) => { clearTimeout(timer); resolve(json); } });
      for (const worker of live) send(worker, { t: 'metrics', id });
    });
  }

  /** Asks every worker to drain and waits for all of them to exit. */
  async drain(graceMs: number): Promise<void> {
    this.draining = true;
    const exits = [...this.workers].map((worker) => new Promise<void>((resolve) => {
      if (worker.isDead()) return resolve();
      worker.once('exit', () => resolve());
      send(worker, { t: 'drain', graceMs });
      // A worker that does not stop in time is killed: shutdown never hangs.
      setTimeout(() => worker.process.kill('SIGKILL'), graceMs + 5000).unref();
    }));
    await Promise.all(exits);
  }

  private fork(slot: Slot): void {
    const worker = cluster.fork();
    slot.startedAt = Date.now();
    this.slots.set(worker, slot);
    this.workers.add(worker);
  }

  private sendToken(worker: Worker, profile: string, state: TokenState): void {
    send(worker, { t: 'token', profile, token: state.token ?? null, usableUntil: state.usableUntil });
  }
}

function send(worker: Worker, message: ToWorker): void {
  if (worker.isConnected()) worker.send(message);
}

export const isWorker = (): boolean => cluster.isWorker;

/** Tokens handed over by the primary; used until the primary's own usable end. */
class HandedTokens {
  readonly profile: string;
  token: Token | undefined;
  usableUntil = 0;
  /** The SDS streams in this worker push each token the primary hands over. */
  private readonly listeners = new Set<() => void>();
  constructor(profile: string) {
    this.profile = profile;
  }
  current(): Token | undefined {
    return systemClock.now() < this.usableUntil ? this.token : undefined;
  }
  onChange(listener: () => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
  /** The primary holds the cache: it decides whether to fetch (see TokenCache.rejected). */
  rejected(token: Token, status: number): void {
    process.send?.({ t: 'rejected', profile: this.profile, obtainedAt: token.obtainedAt, status } satisfies ToPrimary);
  }
  set(token: Token | undefined, usableUntil: number): void {
    this.token = token;
    this.usableUntil = usableUntil;
    for (const listener of this.listeners) listener();
  }
}

/** A worker process: serves ext_proc streams with the tokens the primary sends. */
export async function runWorker(config: Config, logger: Logger): Promise<void> {
  const handed = new Map<string, HandedTokens>();
  for (const name of Object.keys(config.profiles)) handed.set(name, new HandedTokens(name));
  const metrics = new Metrics({ defaultMetrics: false });
  const listener = new GrpcListener({
    profiles: Object.values(config.profiles).map((p) => ({ config: p, tokens: handed.get(p.name)! })),
    logger,
    metrics,
    streamIdleMs: config.server.streamIdleSeconds * 1000,
  });
  const toPrimary = (message: ToPrimary): void => {
    process.send?.(message);
  };
  let draining = false;
  const drain = (graceMs: number): void => {
    if (draining) return;
    draining = true;
    listener.setServing(false);
    listener.drain(graceMs, logger).then(() => process.exit(0), () => process.exit(1));
  };

  process.on('message', (message: ToWorker) => {
    if (message.t === 'token') {
      const slot = handed.get(message.profile);
      slot?.set(message.token ?? undefined, message.usableUntil);
    } else if (message.t === 'serving') {
      if (!draining) listener.setServing(message.ready);
    } else if (message.t === 'metrics') {
      metrics.registry.getMetricsAsJSON().then((json) => toPrimary({ t: 'metrics', id: message.id, json }), () => toPrimary({ t: 'metrics', id: message.id, json: [] }));
    } else if (message.t === 'drain') {
      drain(message.graceMs);
    }
  });
  // The primary decides when to stop; a signal sent to the whole group drains the same way.
  for (const signal of ['SIGTERM', 'SIGINT'] as const) process.on(signal, () => drain(config.server.shutdownGraceSeconds * 1000));

  toPrimary({ t: 'hello' });
  try {
    const address = await listener.bind(config.server.grpc, { removeStaleSocket: false });
    toPrimary({ t: 'listening', address });
  } catch (err) {
    toPrimary({ t: 'bind-failed', message: describeError(err).message });
    process.exit(1);
  }
}

/** Workers' metrics merged with the primary's into one exposition. */
export async function aggregateMetrics(primary: Metrics, pool: WorkerPool): Promise<string> {
  const all = [await primary.registry.getMetricsAsJSON(), ...(await pool.metricsJson())];
  return AggregatorRegistry.aggregate(all as Parameters<typeof AggregatorRegistry.aggregate>[0]).metrics();
}
