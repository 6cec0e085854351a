// The gRPC server that Envoy talks to: the ext_proc service, SDS, ext_authz and gRPC health on
// one port. Used by the single-process sidecar and by each worker process.
//
// The listening socket is ours (node:net), and grpc-js serves the connections we hand it
// (Server.createConnectionInjector). So we count and close connections ourselves: grpc-js's own
// forceShutdown() finds no session to destroy when channelz is off (it only tracks sessions in
// its channelz handler), and its failed bind logs a line of its own before ours. The ext_proc
// Process streams are taken off grpc-js's HTTP/2 server before it sees them and spoken by hand
// (protocols/grpc-stream.ts): one stream per HTTP request, the hot path.
import { chmodSync, rmSync, statSync } from 'node:fs';
import type { Http2Server, IncomingHttpHeaders, ServerHttp2Stream, ServerOptions as Http2ServerOptions } from 'node:http2';
import { constants as http2Constants } from 'node:http2';
import { createServer, type Server as NetServer, type Socket } from 'node:net';
import { Server, ServerCredentials, status as grpcStatus, type ConnectionInjector } from '@grpc/grpc-js';
import { HealthImplementation } from 'grpc-health-check';
import { ExtProcService, type ProfileBinding } from './protocols/ext-proc.ts';
import type { Logger } from './logger.ts';
import type { Metrics } from './metrics.ts';
import { PROCESS_PATH, SERVICE_NAME } from './protocols/ext-proc-wire.ts';
import { GrpcCall, ignore, MessageBudget, refuseNotGrpc, type CallHandler } from './protocols/grpc-stream.ts';
import { authzService, ExtAuthzService } from './protocols/ext-authz.ts';
import { SdsService, sdsService } from './protocols/sds.ts';

/**
 * What a caller can grow on this port, bounded. The only legitimate client is the local Envoy;
 * docs/deployment.md ("Limits on the gRPC port") has the figures behind each number.
 */
export const LIMITS = {
  /** Concurrent connections. Envoy opens about one per worker thread, more only past maxStreamsPerConnection. */
  maxConnections: 128,
  /** HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: past it, Envoy opens another connection. */
  maxStreamsPerConnection: 1000,
  /**
   * Open streams in this process, all connections together; more are reset (REFUSED_STREAM). A
   * held stream costs about 15 KB (measured: 8,000 silent streams took RSS from 117 to 211 MiB);
   * 2,000 keeps 40,000 abusive streams under the pod limit (test/bounds.test.ts). Envoy 1.40
   * closes each ext_proc stream once it has its answer (seen: none open during a streamed
   * response); Envoy ≤1.36 holds one per request in flight. Each worker process has its own.
   */
  maxOpenStreams: 2000,
  /** Node's per-connection memory budget (MB): past it, new streams on that connection are refused. */
  maxSessionMemoryMb: 16,
  /** A request_headers message carries at most Envoy's header limit (max_request_headers_kb, 60 KiB by default). */
  maxMessageBytes: 256 * 1024,
  /**
   * Bytes of messages received in part, all streams together: a client that starts many large
   * messages and never finishes them would otherwise hold maxMessageBytes per open stream. Past
   * it, the stream whose message does not fit gets RESOURCE_EXHAUSTED. Envoy writes each
   * message's frames back to back: a message still in part after 2 s is dropped with its stream.
   */
  maxPartialBytes: 32 * 1024 * 1024,
  /**
   * Reply bytes written but not yet taken by the client, per stream, checked as each message
   * comes in: past it, the stream is reset. Two replies with a token of maxTokenBytes (16 KiB by
   * default), some forty with a typical one. Envoy takes every reply at once.
   */
  maxUnsentBytes: 32 * 1024,
  /** Envoy sends request_headers as it opens the stream: a stream without a first message by then is closed. */
  firstMessageMs: 10_000,
  /**
   * Received RST_STREAM frames per connection (Node's rapid-reset guard, CVE-2023-44487): a
   * token bucket of `burst` resets refilled at `rate` a second; past it, GOAWAY. Envoy with its
   * default settings resets every ext_proc stream, so its reset rate is the request rate.
   * Measured with Envoy 1.40 (--concurrency 2) saturating the sidecar on 2 cores: 5,262 to
   * 7,049 resets a second in one-second samples, over 2 connections; 0 with the shipped
   * envoy.yaml (graceful close). The rate is about 3x the whole process's peak (which one
   * connection carries when Envoy runs one worker), the burst 2 s of it; a rapid-reset flood
   * runs far above (docs/deployment.md, test/stream-resets.test.ts).
   */
  resetRate: 20_000,
  resetBurst: 40_000,
} as const;

/** How often idle streams are looked for; also the resolution of the idle limits. */
const SWEEP_MS = 1000;
/** After its status, a stream the client does not close within this is reset. */
const CLOSE_GRACE_MS = 2000;
/**
 * A message that came in part and is still not complete after this is abandoned: Envoy writes
 * each message's frames back to back, so only a client holding the budget waits this long.
 */
const PARTIAL_MESSAGE_MS = 2000;
/**
 * Drain: the process stops once no stream has opened for this long and none is open. Under
 * load through Envoy the gap between two streams is well under a millisecond; 2 s still waits
 * out a client that pauses between requests, and lets Envoy exit first when both are stopped.
 */
export const DRAIN_QUIET_MS = 2000;

type StreamListener = (stream: ServerHttp2Stream, headers: IncomingHttpHeaders, flags: number, rawHeaders: string[]) => void;

export interface ListenerOptions {
  profiles: readonly ProfileBinding[];
  logger: Logger;
  metrics: Metrics;
  /** A stream with nothing to do for this long is closed (server.streamIdleSeconds). */
  streamIdleMs?: number;
}

export class GrpcListener implements CallHandler {
  readonly service: ExtProcService;
  private readonly server: Server;
  private readonly health = new HealthImplementation({ '': 'NOT_SERVING', [SERVICE_NAME]: 'NOT_SERVING' });
  private readonly logger: Logger;
  private readonly idleMs: number;
  private readonly injector: ConnectionInjector;
  private netServer: NetServer | undefined;
  private socketPath: string | undefined;
  private readonly sockets = new Set<Socket>();
  /**
   * Open ext_proc streams. On each, openedAt, lastActive and failedAt are times of the SWEEP
   * clock (`now`: the coarse clock costs nothing per message); failedAt is 0 until the stream
   * was sent its status (an error by us, or any status the sweep then sees).
   */
  private readonly streams = new Set<GrpcCall>();
  private readonly messageLimits = new MessageBudget(LIMITS.maxMessageBytes, LIMITS.maxPartialBytes);
  private now = Date.now();
  private lastStreamAt = 0;
  /** Set by close(): streams that open after it are refused (Envoy retries those elsewhere). */
  private closing = false;
  private readonly sweeper: NodeJS.Timeout;
  private readonly refusals = { connections: 0, streams: 0, idle: 0, unread: 0 };
  private lastRefusalLog = 0;

  constructor(options: ListenerOptions) {
    this.logger = options.logger;
    this.idleMs = options.streamIdleMs ?? 60_000;
    this.service = new ExtProcService(options);
    this.server = new Server({
      // channelz bookkeeping per call is pure overhead for a sidecar.
      'grpc.enable_channelz': 0,
      'grpc.max_concurrent_streams': LIMITS.maxStreamsPerConnection,
      // grpc-js turns Node's session memory limit off by default; an unread connection then grows without end.
      'grpc-node.max_session_memory': LIMITS.maxSessionMemoryMb,
      'grpc.max_receive_message_length': LIMITS.maxMessageBytes,
    });
    setHttp2Options(this.server, { streamResetBurst: LIMITS.resetBurst, streamResetRate: LIMITS.resetRate });
    this.server.addService(sdsService, new SdsService(options).handlers);
    this.server.addService(authzService, new ExtAuthzService(options).handlers);
    this.health.addToServer(this.server);
    this.injector = this.server.createConnectionInjector(ServerCredentials.createInsecure());
    takeProcessStreams(this.server, (stream, headers) => this.admit(stream, headers));
    this.sweeper = setInterval(() => this.sweep(), SWEEP_MS).unref();
  }

  /** gRPC health follows readiness (SERVING only when every profile has a token). */
  setServing(ready: boolean): void {
    const status = ready ? 'SERVING' : 'NOT_SERVING';
    this.health.setStatus('', status);
    this.health.setStatus(SERVICE_NAME, status);
  }

  get openStreams(): number {
    return this.streams.size;
  }

  get connections(): number {
    return this.sockets.size;
  }

  /** Binds `host:port` or `unix:/path`; resolves with the address actually bound. */
  async bind(address: string, options: { removeStaleSocket?: boolean } = {}): Promise<string> {
    const server = createServer({ noDelay: true }, (socket) => this.accept(socket));
    this.netServer = server;
    let listen: { path: string } | { host: string; port: number };
    if (address.startsWith('unix:')) {
      const path = address.slice('unix:'.length).replace(/^\/\/(?=\/)/, '');
      if (options.removeStaleSocket ?? true) removeStaleSocket(path);
      this.socketPath = path;
      listen = { path };
    } else {
      const i = address.lastIndexOf(':');
      listen = { host: address.slice(0, i).replace(/^\[(.*)\]$/, '$1'), port: Number(address.slice(i + 1)) };
    }
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ ...listen, backlog: 511 }, () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', (err) => this.logger.error({ err }, 'gRPC listener error'));
    if (this.socketPath !== undefined) {
      // The ext_proc answer carries the access token: only the owner and its group (the pod's
      // fsGroup, shared with Envoy) may connect.
      chmodSync(this.socketPath, 0o660);
      return `unix:${this.socketPath}`;
    }
    const port = (server.address() as { port: number }).port;
    return `${address.slice(0, address.lastIndexOf(':'))}:${port}`;
  }

  /**
   * SIGTERM: keeps serving every stream, open and new (Envoy still sends requests while it
   * learns that this pod is going), until no stream has opened for DRAIN_QUIET_MS and none is
   * open, or until graceMs; then closes whatever is left.
   */
  async drain(graceMs: number, logger: Logger = this.logger): Promise<void> {
    const deadline = Date.now() + graceMs;
    this.lastStreamAt = Math.max(this.lastStreamAt, Date.now());
    await new Promise<void>((resolve) => {
      const check = (): void => {
        const now = Date.now();
        const quiet = this.streams.size === 0 && now - this.lastStreamAt >= DRAIN_QUIET_MS;
        if (quiet || now >= deadline) {
          clearInterval(timer);
          resolve();
        }
      };
      const timer = setInterval(check, 50);
      check();
    });
    if (this.streams.size > 0) logger.warn({ openStreams: this.streams.size }, 'grace period over: closing the remaining streams');
    await this.close();
  }

  /** Stops listening and ends every open stream with UNAVAILABLE, then every connection. */
  private async close(): Promise<void> {
    this.closing = true;
    this.netServer?.close();
    for (const call of this.streams) call.fail(grpcStatus.UNAVAILABLE, 'the sidecar is shutting down');
    // GOAWAY on every connection; those that have not closed shortly after are cut.
    this.injector.destroy();
    const closed = [...this.sockets].map((socket) => new Promise<void>((resolve) => {
      if (socket.destroyed) return resolve();
      socket.once('close', () => resolve());
    }));
    const cut = setTimeout(() => this.forceShutdown(), 500);
    await Promise.all(closed);
    clearTimeout(cut);
    this.forceShutdown();
  }

  /** Closes every connection at once, and with them every open stream. */
  forceShutdown(): void {
    clearInterval(this.sweeper);
    this.netServer?.close();
    for (const socket of this.sockets) socket.destroy();
    this.sockets.clear();
    this.injector.destroy();
    this.server.forceShutdown();
  }

  private accept(socket: Socket): void {
    if (this.sockets.size >= LIMITS.maxConnections) {
      this.refusals.connections++;
      this.logRefusals();
      socket.destroy();
      return;
    }
    this.sockets.add(socket);
    socket.once('close', () => this.sockets.delete(socket));
    socket.on('error', () => {}); // a peer that went away; the session handles the rest
    this.injector.injectConnection(socket);
  }

  private admit(stream: ServerHttp2Stream, headers: IncomingHttpHeaders): void {
    this.lastStreamAt = Date.now();
    if (this.closing || this.streams.size >= LIMITS.maxOpenStreams) {
      if (!this.closing) {
        this.refusals.streams++;
        this.logRefusals();
      }
      // REFUSED_STREAM: nothing was processed, so Envoy may retry it; and unlike a status, a
      // reset needs no reading client.
      stream.on('error', ignore); // our own reset, reported back
      stream.close(http2Constants.NGHTTP2_REFUSED_STREAM);
      return;
    }
    const contentType = headers['content-type'];
    if (typeof contentType !== 'string' || !contentType.startsWith('application/grpc')) {
      stream.on('error', ignore);
      refuseNotGrpc(stream);
      return;
    }
    const call = new GrpcCall(stream, headers, this, this.messageLimits);
    call.openedAt = call.lastActive = this.now;
    // Counted until the HTTP/2 stream is gone: a client that does not read still holds the
    // stream and its replies after its status is queued.
    this.streams.add(call);
    this.service.open(call);
  }

  /** CallHandler: each message passes the stream bounds before the service answers it. */
  message(call: GrpcCall, bytes: Buffer): void {
    call.lastActive = this.now;
    call.messages++;
    if (call.unsentBytes >= LIMITS.maxUnsentBytes && call.failedAt === 0) {
      // The client sends but does not read: its replies would pile up in memory.
      call.failedAt = this.now;
      this.refusals.unread++;
      this.logRefusals();
      call.reset();
      return;
    }
    this.service.message(call, bytes);
  }

  end(call: GrpcCall): void {
    this.service.end(call);
  }

  closed(call: GrpcCall): void {
    if (this.streams.delete(call)) this.service.closed(call);
  }

  /** Once a second: close streams that never asked anything, or that sit with nothing to do. */
  private sweep(): void {
    const now = Date.now();
    this.now = now;
    for (const call of this.streams) {
      if (call.failedAt === 0 && call.statusSent) call.failedAt = now; // answered elsewhere (OK or not)
      if (call.failedAt !== 0) {
        // Told to go, still open: its client does not read, so the status cannot reach it.
        if (now - call.failedAt >= CLOSE_GRACE_MS) call.reset();
      } else if (call.partialSince !== 0 && now - call.partialSince >= PARTIAL_MESSAGE_MS) {
        call.failedAt = now;
        this.refusals.idle++;
        call.fail(grpcStatus.DEADLINE_EXCEEDED, `a message was not completed within ${PARTIAL_MESSAGE_MS / 1000} s`);
      } else if (call.messages === 0 && now - call.openedAt >= LIMITS.firstMessageMs) {
        call.failedAt = now;
        this.refusals.idle++;
        call.fail(grpcStatus.DEADLINE_EXCEEDED, `no request_headers within ${LIMITS.firstMessageMs / 1000} s`);
      } else if (now - call.lastActive >= this.idleMs) {
        call.failedAt = now;
        this.refusals.idle++;
        call.fail(grpcStatus.DEADLINE_EXCEEDED, `ext_proc stream idle for ${this.idleMs / 1000} s`);
      }
    }
    if (this.refusals.idle > 0) this.logRefusals();
  }

  /** One warning a minute at most, with the counts since the last one. */
  private logRefusals(): void {
    const now = Date.now();
    if (now - this.lastRefusalLog < 60_000) return;
    this.lastRefusalLog = now;
    this.logger.warn({ ...this.refusals, limits: LIMITS, streamIdleMs: this.idleMs },
      'gRPC port limits reached: connections, streams or idle streams were closed (the only client should be the local Envoy)');
    this.refusals.connections = this.refusals.streams = this.refusals.idle = this.refusals.unread = 0;
  }
}

/**
 * Puts `admit` before grpc-js for the Process method: on the HTTP/2 server grpc-js made for the
 * injector (its private http2Servers, @grpc/grpc-js 1.14), grpc-js's own 'stream' listener is
 * replaced by one that hands it every other stream. Fails loudly if a grpc-js update moves them.
 */
function takeProcessStreams(server: Server, admit: (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => void): void {
  const servers = (server as unknown as { http2Servers?: Map<Http2Server, unknown> }).http2Servers;
  const http2Server = servers instanceof Map && servers.size === 1 ? [...servers.keys()][0] : undefined;
  const grpcListeners = http2Server?.listeners('stream') as StreamListener[] | undefined;
  if (http2Server === undefined || grpcListeners?.length !== 1) {
    throw new Error('@grpc/grpc-js no longer keeps its HTTP/2 server where expected: the ext_proc streams cannot be served (pin @grpc/grpc-js ~1.14)');
  }
  const grpcListener = grpcListeners[0]!;
  http2Server.removeAllListeners('stream');
  http2Server.on('stream', (stream: ServerHttp2Stream, headers: IncomingHttpHeaders, flags: number, rawHeaders: string[]) => {
    if (headers[':path'] === PROCESS_PATH) admit(stream, headers);
    else grpcListener.call(http2Server, stream, headers, flags, rawHeaders);
  });
}

/**
 * grpc-js passes no HTTP/2 server option but a few of its own; the reset limiter's options
 * (nodejs/node#54875, Node ≥22) reach http2.createServer only through the options object it
 * keeps for that (private, @grpc/grpc-js 1.14). Fails loudly if a grpc-js update moves it.
 */
function setHttp2Options(server: Server, options: Http2ServerOptions): void {
  const common = (server as unknown as { commonServerOptions?: Http2ServerOptions }).commonServerOptions;
  if (common === undefined || typeof common !== 'object') {
    throw new Error('@grpc/grpc-js no longer keeps commonServerOptions: the HTTP/2 reset limits cannot be set (pin @grpc/grpc-js ~1.14)');
  }
  Object.assign(common, options);
}

export function removeStaleSocket(path: string): void {
  try {
    if (statSync(path).isSocket()) rmSync(path);
  } catch {
    // Nothing there: fine.
  }
}
