// Wiring: token caches per profile, the ext_proc gRPC server (with gRPC health), the admin HTTP
// server, readiness, and shutdown. Everything with I/O is injectable for tests.
import { chmodSync, rmSync, statSync } from 'node:fs';
import type { Server as HttpServer } from 'node:http';
import { Server, ServerCredentials } from '@grpc/grpc-js';
import type { Dispatcher } from 'undici';
import { startAdminServer } from './admin-server.ts';
import { systemClock, type Clock } from './clock.ts';
import type { Config } from './config.ts';
import { ExtProcService } from './ext-proc-service.ts';
import { Readiness } from './health.ts';
import type { Logger } from './logger.ts';
import { Metrics } from './metrics.ts';
import { extProcService } from './protocol.ts';
import { TokenCache } from './token-cache.ts';
import { TokenSource } from './token-source.ts';

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

// Envoy resets (RST_STREAM) essentially every ext_proc stream once it is done with it. Node's
// HTTP/2 server answers more than ~1,000 resets per connection (then ~33/s) with GOAWAY, failing
// every stream in flight (the CVE-2023-44487 "rapid reset" guard). The only client here is the
// local Envoy, whose stream rate is the request rate, so the guard is raised far above any rate
// one Node process can serve. grpc-js does not expose these http2 options; they are added to the
// options it passes to http2.createServer (nodejs/node#54875, Node ≥22).
const HTTP2_RESET_LIMITS = { streamResetBurst: 1_000_000, streamResetRate: 1_000_000 };

export class Sidecar {
  readonly readiness: Readiness;
  readonly metrics: Metrics;
  private readonly config: Config;
  private readonly logger: Logger;
  private readonly caches: Map<string, TokenCache>;
  private readonly service: ExtProcService;
  private readonly grpcServer: Server;
  private adminServer: HttpServer | undefined;
  private socketPath: string | undefined;

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
    this.readiness = new Readiness(
      [...this.caches].map(([name, cache]) => ({ name, hasToken: () => cache.current() !== undefined })),
    );
    for (const cache of this.caches.values()) cache.onChange(() => this.readiness.update());
    this.readiness.onChange((ready) => {
      if (ready) this.logger.info({ profiles: [...this.caches.keys()] }, 'ready: every profile holds a token');
      else if (!this.readiness.isDraining()) this.logger.warn(this.readiness.details(), 'not ready: a profile has no usable token');
    });

    this.service = new ExtProcService({
      profiles: [...this.caches].map(([name, cache]) => ({ config: config.profiles[name]!, tokens: cache })),
      logger,
      metrics: this.metrics,
    });
    // channelz bookkeeping per call is pure overhead for a sidecar.
    this.grpcServer = new Server({ 'grpc.enable_channelz': 0 });
    Object.assign((this.grpcServer as unknown as { commonServerOptions: object }).commonServerOptions, HTTP2_RESET_LIMITS);
    this.grpcServer.addService(extProcService, { Process: this.service.process });
    this.readiness.grpcHealth.addToServer(this.grpcServer);
  }

  /** Binds both listeners, then starts fetching tokens. Rejects (nothing left bound) on failure. */
  async start(): Promise<Addresses> {
    const grpc = await this.bindGrpc(this.config.server.grpc);
    try {
      const admin = await startAdminServer({
        address: this.config.server.admin,
        readiness: this.readiness,
        metrics: this.metrics,
        logger: this.logger,
      });
      this.adminServer = admin.server;
      const adminAddress = `${this.config.server.admin.slice(0, this.config.server.admin.lastIndexOf(':'))}:${admin.port}`;
      for (const cache of this.caches.values()) cache.start();
      this.readiness.update();
      this.logger.info({ grpc, admin: adminAddress, profiles: [...this.caches.keys()] }, 'listening');
      return { grpc, admin: adminAddress };
    } catch (err) {
      this.grpcServer.forceShutdown();
      throw err;
    }
  }

  /** SIGTERM: not ready at once, let open streams finish within the grace period, then stop. */
  async shutdown(graceMs = this.config.server.shutdownGraceSeconds * 1000): Promise<void> {
    this.readiness.startDraining();
    this.logger.info({ openStreams: this.service.streamsOpen, graceSeconds: graceMs / 1000 }, 'draining');
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.logger.warn({ openStreams: this.service.streamsOpen }, 'grace period over: closing the remaining streams');
        this.grpcServer.forceShutdown();
        resolve();
      }, graceMs);
      this.grpcServer.tryShutdown(() => {
        clearTimeout(timer);
        resolve();
      });
    });
    for (const cache of this.caches.values()) cache.stop();
    if (this.adminServer !== undefined) {
      this.adminServer.closeAllConnections();
      await new Promise<void>((resolve) => this.adminServer!.close(() => resolve()));
    }
    if (this.socketPath !== undefined) rmSync(this.socketPath, { force: true });
    this.logger.info('stopped');
  }

  private async bindGrpc(address: string): Promise<string> {
    let target = address;
    if (address.startsWith('unix:')) {
      const path = address.slice('unix:'.length).replace(/^\/\/(?=\/)/, '');
      removeStaleSocket(path);
      this.socketPath = path;
      target = `unix:${path}`;
    }
    const port = await new Promise<number>((resolve, reject) => {
      this.grpcServer.bindAsync(target, ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
    });
    if (this.socketPath !== undefined) {
      // The ext_proc answer carries the access token: only the owner and its group (the pod's
      // fsGroup, shared with Envoy) may connect.
      chmodSync(this.socketPath, 0o660);
      return `unix:${this.socketPath}`;
    }
    return `${address.slice(0, address.lastIndexOf(':'))}:${port}`;
  }
}

function removeStaleSocket(path: string): void {
  try {
    if (statSync(path).isSocket()) rmSync(path);
  } catch {
    // Nothing there: fine.
  }
}
