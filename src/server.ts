// Wiring: token caches per profile, the ext_proc gRPC listener (in this process, or in
// `server.workers` worker processes), the admin HTTP server, readiness, and shutdown.
import { rmSync } from 'node:fs';
import type { Server as HttpServer } from 'node:http';
import type { Dispatcher } from 'undici';
import { startAdminServer } from './admin-server.ts';
import { systemClock, type Clock } from './clock.ts';
import type { Config } from './config.ts';
import { GrpcListener, removeStaleSocket } from './grpc-listener.ts';
import { Readiness } from './health.ts';
import type { Logger } from './logger.ts';
import { Metrics } from './metrics.ts';
import { TokenCache } from './token-cache.ts';
import { TokenSource } from './token-source.ts';
import { aggregateMetrics, WorkerPool, type TokenState } from './workers.ts';

export interface SidecarOptions {
  config: Config;
  logger: Logger;
  metrics?: Metrics;
  clock?: Clock;
  dispatcher?: Dispatcher;
}

export interface Addresses {
  /** What the ext_proc server listens on: `127.0.0.1:PORT` or `unix:/path`. */
  grpc: string;
  admin: string;
}

export class Sidecar {
  readonly readiness: Readiness;
  readonly metrics: Metrics;
  private readonly config: Config;
  private readonly logger: Logger;
  private readonly caches: Map<string, TokenCache>;
  /** Serves streams in this process (workers: 1) … */
  private readonly listener: GrpcListener | undefined;
  /** … or in worker processes, which get every token from here. */
  private readonly pool: WorkerPool | undefined;
  private adminServer: HttpServer | undefined;

  constructor(options: SidecarOptions) {
    const { config, logger } = options;
    const clock = options.clock ?? systemClock;
    this.config = config;
    this.logger = logger;
    this.metrics = options.metrics ?? new Metrics();
    this.caches = new Map();
    for (const profile of Object.values(config.profiles)) {
      const source = new TokenSource(profile, { dispatcher: options.dispatcher, clock });
      const cache = new TokenCache({ profile, source, logger, metrics: this.metrics, clock });
      this.caches.set(profile.name, cache);
      this.metrics.observeTokenExpiry(profile.name, () => {
        const token = cache.current();
        return token === undefined ? undefined : (token.expiresAt - clock.now()) / 1000;
      });
    }
    if (config.server.workers > 1) {
      this.pool = new WorkerPool({
        count: config.server.workers,
        logger,
        tokens: () => this.tokenStates(),
        onChange: () => this.readiness.update(),
        // A worker's backend refused a token: the primary's cache decides whether to fetch.
        onRejected: (profile, obtainedAt, status) => {
          const cache = this.caches.get(profile);
          const token = cache?.current();
          if (token !== undefined && token.obtainedAt === obtainedAt) cache!.rejected(token, status);
        },
      });
      this.metrics.observeWorkers(this.pool);
    }
    // One readiness, read by /readyz and pushed to gRPC health here or in every worker.
    this.readiness = new Readiness(
      [...this.caches].map(([name, cache]) => ({
        name,
        failOpen: config.profiles[name]!.onFailure === 'allow',
        hasToken: () => cache.current() !== undefined,
        tried: () => cache.tried,
      })),
      { workers: this.pool },
    );

    if (this.pool !== undefined) {
      for (const [name, cache] of this.caches) {
        cache.onChange(() => this.pool!.broadcastToken(name, { token: cache.current(), usableUntil: cache.usableUntil }));
      }
      this.readiness.onChange((ready) => this.pool!.setServing(ready));
    } else {
      this.listener = new GrpcListener({
        profiles: [...this.caches].map(([name, cache]) => ({ config: config.profiles[name]!, tokens: cache })),
        logger,
        metrics: this.metrics,
        streamIdleMs: config.server.streamIdleSeconds * 1000,
      });
      this.readiness.onChange((ready) => this.listener!.setServing(ready));
    }
    for (const cache of this.caches.values()) {
      cache.onChange(() => this.readiness.update());
      cache.onFetchEnd(() => this.readiness.update()); // a fail-open profile is ready once it tried
    }
    // Not ready at start, while the first fetches are in flight, is normal and logs nothing; a
    // failed fetch logs its own warning. Losing readiness after having had it is what warns here.
    let wasReady = false;
    this.readiness.onChange((ready) => {
      const details = this.readiness.details();
      const missing = Object.keys(details.profiles).filter((name) => details.profiles[name] === 'no_token');
      if (ready && missing.length === 0) {
        this.logger.info({ profiles: [...this.caches.keys()] }, 'ready: every profile holds a token');
      } else if (ready) {
        this.logger.warn({ ...details, withoutToken: missing }, 'ready: serving, but an onFailure: allow profile has no token (its requests continue without one)');
      } else if (wasReady && !this.readiness.isDraining()) {
        const why = details.workers?.serving === 0 ? 'no worker is serving' : 'a profile has no usable token';
        this.logger.warn(details, `not ready: ${why}`);
      }
      wasReady ||= ready;
    });
  }

  /** Binds both listeners, then starts fetching tokens. Rejects (nothing left bound) on failure. */
  async start(): Promise<Addresses> {
    let grpc: string;
    try {
      grpc = await this.bindGrpc();
    } catch (err) {
      // The workers that did bind stop too (else they log a broken channel to a gone primary).
      await this.pool?.drain(0);
      throw err;
    }
    try {
      const admin = await startAdminServer({
        address: this.config.server.admin,
        readiness: this.readiness,
        metricsText: this.pool === undefined ? () => this.metrics.registry.metrics() : () => aggregateMetrics(this.metrics, this.pool!),
        contentType: this.metrics.registry.contentType,
        logger: this.logger,
      });
      this.adminServer = admin.server;
      const adminAddress = `${this.config.server.admin.slice(0, this.config.server.admin.lastIndexOf(':'))}:${admin.port}`;
      for (const cache of this.caches.values()) cache.start();
      this.readiness.update();
      this.logger.info({ grpc, admin: adminAddress, profiles: [...this.caches.keys()], workers: this.config.server.workers }, 'listening');
      return { grpc, admin: adminAddress };
    } catch (err) {
      this.listener?.forceShutdown();
      await this.pool?.drain(0);
      throw err;
    }
  }

  /** SIGTERM: not ready at once, let open streams finish within the grace period, then stop. */
  async shutdown(graceMs = this.config.server.shutdownGraceSeconds * 1000): Promise<void> {
    this.readiness.startDraining();
    this.logger.info({ openStreams: this.listener?.service.streamsOpen, graceSeconds: graceMs / 1000 }, 'draining');
    await this.listener?.drain(graceMs, this.logger);
    await this.pool?.drain(graceMs);
    for (const cache of this.caches.values()) cache.stop();
    if (this.adminServer !== undefined) {
      this.adminServer.closeAllConnections();
      await new Promise<void>((resolve) => this.adminServer!.close(() => resolve()));
    }
    const grpc = this.config.server.grpc;
    if (grpc.startsWith('unix:')) rmSync(grpc.slice('unix:'.length).replace(/^\/\/(?=\/)/, ''), { force: true });
    this.logger.info('stopped');
  }

  private async bindGrpc(): Promise<string> {
    const address = this.config.server.grpc;
    if (this.listener !== undefined) return this.listener.bind(address);
    // Workers share one listening socket through the primary; a stale socket file goes first.
    if (address.startsWith('unix:')) removeStaleSocket(address.slice('unix:'.length).replace(/^\/\/(?=\/)/, ''));
    return this.pool!.start();
  }

  private tokenStates(): Map<string, TokenState> {
    return new Map([...this.caches].map(([name, cache]) => [name, { token: cache.current(), usableUntil: cache.usableUntil }]));
  }
}
