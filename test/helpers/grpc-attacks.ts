// Abusive clients of the gRPC port, written on node:http2 directly so that they can do what a
// grpc-js client never does: leave streams open with no message, never read a reply, reset
// streams as fast as the socket takes them.
import { connect, constants, type ClientHttp2Session, type ClientHttp2Stream } from 'node:http2';
import { readFileSync } from 'node:fs';
import { parse } from 'yaml';
import { PROCESS_PATH } from '../../src/protocols/ext-proc-wire.ts';
import { requestHeaders, TYPICAL_HEADERS, upstreamMethod } from './extproc-client.ts';

/** A message with its gRPC prefix (gRPC over HTTP/2, "Length-Prefixed-Message"). */
export function grpcFrame(body: Buffer, compressed = false): Buffer {
  const prefix = Buffer.alloc(5);
  prefix[0] = compressed ? 1 : 0;
  prefix.writeUInt32BE(body.length, 1);
  return Buffer.concat([prefix, body]);
}

/** One length-prefixed gRPC message (uncompressed) carrying a typical request_headers. */
export function requestHeadersFrame(): Buffer {
  return grpcFrame(upstreamMethod().requestSerialize(requestHeaders(TYPICAL_HEADERS)));
}

export function openSession(address: string): Promise<ClientHttp2Session> {
  return new Promise((resolve, reject) => {
    const session = connect(`http://${address}`);
    session.once('connect', () => resolve(session));
    session.once('error', reject);
  });
}

export function openStream(session: ClientHttp2Session): ClientHttp2Stream {
  const stream = session.request({ ':method': 'POST', ':path': PROCESS_PATH, 'content-type': 'application/grpc', te: 'trailers' }, { endStream: false });
  stream.on('error', () => {});
  return stream;
}

/** The `grpc-status` a stream ended with (from its trailers), or `reset` when it had none. */
export function streamOutcome(stream: ClientHttp2Stream): Promise<string> {
  return new Promise((resolve) => {
    let status: string | undefined;
    stream.on('response', (headers) => {
      if (headers['grpc-status'] !== undefined) status = String(headers['grpc-status']);
    });
    stream.on('trailers', (trailers) => {
      status = String(trailers['grpc-status']);
    });
    stream.on('close', () => resolve(status ?? 'reset'));
  });
}

/** Resident memory of a process, in bytes (Linux). */
export function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m === null ? 0 : Number(m[1]) * 1024;
}

/** Samples a process's RSS every 50 ms until stopped; returns the peak. */
export function watchRss(pid: number): { stop(): number } {
  let peak = rssBytes(pid);
  const timer = setInterval(() => {
    try {
      peak = Math.max(peak, rssBytes(pid));
    } catch {
      // exited
    }
  }, 50);
  return {
    stop() {
      clearInterval(timer);
      return peak;
    },
  };
}

/** The memory limit that deploy/kubernetes/deployment.yaml sets for a container, in bytes. */
export function manifestMemoryLimit(container: string): number {
  const text = readFileSync(new URL('../../deploy/kubernetes/deployment.yaml', import.meta.url), 'utf8');
  for (const doc of text.split(/^---$/m).map((d) => parse(d))) {
    const spec = doc?.spec?.template?.spec;
    for (const c of [...(spec?.initContainers ?? []), ...(spec?.containers ?? [])]) {
      if (c.name !== container) continue;
      const limit = String(c.resources?.limits?.memory ?? '');
      const m = /^(\d+)(Mi|Gi|M|G)?$/.exec(limit);
      if (m === null) throw new Error(`cannot read the memory limit "${limit}" of ${container}`);
      const unit = { Mi: 2 ** 20, Gi: 2 ** 30, M: 1e6, G: 1e9 }[m[2] ?? ''] ?? 1;
      return Number(m[1]) * unit;
    }
  }
  throw new Error(`no container ${container} in deploy/kubernetes/deployment.yaml`);
}

/**
 * The Node flags the sidecar runs with in the pod: the image's NODE_OPTIONS (Dockerfile), and
 * the heap limit Node derives from the container's memory limit (V8 takes a quarter of the
 * memory, doubled on 64-bit: 128 MiB of old space for 256 Mi). Without a cgroup limit here,
 * Node would size its heap from the whole machine and collect garbage far later than in the pod.
 */
export function podNodeOptions(memoryLimit: number): string {
  const dockerfile = readFileSync(new URL('../../Dockerfile', import.meta.url), 'utf8');
  const image = /^ENV NODE_OPTIONS="([^"]*)"/m.exec(dockerfile)?.[1] ?? '';
  return `${image} --max-old-space-size=${Math.floor(memoryLimit / 2 / 2 ** 20)}`.trim();
}

/**
 * Opens a stream and resets it at once, as fast as the session takes them, until the server
 * sends GOAWAY or `max` streams were sent.
 */
export async function resetFlood(address: string, max: number): Promise<{ sent: number; goaway: number | undefined }> {
  const session = await openSession(address);
  let goaway: number | undefined;
  session.on('goaway', (code) => (goaway = code));
  session.on('error', () => {});
  let sent = 0;
  while (goaway === undefined && sent < max && !session.destroyed && !session.closed) {
    for (let i = 0; i < 200 && sent < max; i++) {
      try {
        openStream(session).close(constants.NGHTTP2_CANCEL);
      } catch {
        break; // the session is going away
      }
      sent++;
    }
    await new Promise((resolve) => setImmediate(resolve));
  }
  await new Promise((resolve) => setTimeout(resolve, 200));
  session.destroy();
  return { sent, goaway };
}
