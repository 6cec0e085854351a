// The gRPC server that Envoy talks to: the ext_proc service and gRPC health on one port. Used
// by the single-process sidecar and by each worker process.
import { chmodSync, rmSync, statSync } from 'node:fs';
import { Server, ServerCredentials } from '@grpc/grpc-js';
import { HealthImplementation } from 'grpc-health-check';
import { ExtProcService, type ProfileBinding } from './ext-proc-service.ts';
import type { Logger } from './logger.ts';
import type { Metrics } from './metrics.ts';
import { extProcService, SERVICE_NAME } from './protocol.ts';

// Envoy resets (RST_STREAM) essentially every ext_proc stream once it is done with it. Node's
// HTTP/2 server answers more than ~1,000 resets per connection (then ~33/s) with GOAWAY, failing
// every stream in flight (the CVE-2023-44487 "rapid reset" guard). The only client here is the
// local Envoy, whose stream rate is the request rate, so the guard is raised far above any rate
// one Node process can serve. grpc-js does not expose these http2 options; they are added to the
// options it passes to http2.createServer (nodejs/node#54875, Node ≥22).
const HTTP2_RESET_LIMITS = { streamResetBurst: 1_000_000, streamResetRate: 1_000_000 };

export class GrpcListener {
  readonly service: ExtProcService;
  private readonly server: Server;
  private readonly health = new HealthImplementation({ '': 'NOT_SERVING', [SERVICE_NAME]: 'NOT_SERVING' });
  private socketPath: string | undefined;

  constructor(options: { profiles: readonly ProfileBinding[]; logger: Logger; metrics: Metrics }) {
    this.service = new ExtProcService(options);
    // channelz bookkeeping per call is pure overhead for a sidecar.
    this.server = new Server({ 'grpc.enable_channelz': 0 });
    Object.assign((this.server as unknown as { commonServerOptions: object }).commonServerOptions, HTTP2_RESET_LIMITS);
    this.server.addService(extProcService, { Process: this.service.process });
    this.health.addToServer(this.server);
  }

  /** gRPC health follows readiness (SERVING only when every profile has a token). */
  setServing(ready: boolean): void {
    const status = ready ? 'SERVING' : 'NOT_SERVING';
    this.health.setStatus('', status);
    this.health.setStatus(SERVICE_NAME, status);
  }

  /** Binds `host:port` or `unix:/path`; resolves with the address actually bound. */
  async bind(address: string, options: { removeStaleSocket?: boolean } = {}): Promise<string> {
    let target = address;
    if (address.startsWith('unix:')) {
      const path = address.slice('unix:'.length).replace(/^\/\/(?=\/)/, '');
      if (options.removeStaleSocket ?? true) removeStaleSocket(path);
      this.socketPath = path;
      target = `unix:${path}`;
    }
    const port = await new Promise<number>((resolve, reject) => {
      this.server.bindAsync(target, ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
    });
    if (this.socketPath !== undefined) {
      // The ext_proc answer carries the access token: only the owner and its group (the pod's
      // fsGroup, shared with Envoy) may connect.
      chmodSync(this.socketPath, 0o660);
      return `unix:${this.socketPath}`;
    }
    return `${address.slice(0, address.lastIndexOf(':'))}:${port}`;
  }

  /** Lets open streams finish within graceMs, then closes what is left. */
  async drain(graceMs: number, logger: Logger): Promise<void> {
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        logger.warn({ openStreams: this.service.streamsOpen }, 'grace period over: closing the remaining streams');
        this.server.forceShutdown();
        resolve();
      }, graceMs);
      this.server.tryShutdown(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  forceShutdown(): void {
    this.server.forceShutdown();
  }
}

export function removeStaleSocket(path: string): void {
  try {
    if (statSync(path).isSocket()) rmSync(path);
  } catch {
    // Nothing there: fine.
  }
}
