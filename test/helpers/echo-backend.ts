// The backend behind Envoy: a node:http server on 127.0.0.1 that records the headers each
// request arrived with, so the tests can check what the application really receives.
import { createServer, type IncomingHttpHeaders } from 'node:http';
import type { AddressInfo } from 'node:net';

export interface ReceivedRequest {
  method: string;
  url: string;
  headers: IncomingHttpHeaders;
  /** Names and values as they came on the wire, repeated headers kept apart. */
  rawHeaders: string[];
}

export interface EchoBackend {
  /** `127.0.0.1:PORT`. */
  address: string;
  url: string;
  /** The last `keep` requests (all of them by default). */
  requests: ReceivedRequest[];
  /** Counts over every request, for load tests that keep none. */
  tally: {
    total: number;
    /** How many requests carried each distinct `authorization` value (`<none>` when absent). */
    authorization: Map<string, number>;
    /** Requests that carried a header whose name is in `watch`. */
    watched: number;
  };
  close(): Promise<void>;
}

export interface EchoOptions {
  /** Keep only the last `keep` requests (default: all). */
  keep?: number;
  /** Lower-case header names counted in `tally.watched`. */
  watch?: readonly string[];
}

export async function startEchoBackend(options: EchoOptions = {}): Promise<EchoBackend> {
  const keep = options.keep ?? Number.POSITIVE_INFINITY;
  const watch = new Set(options.watch ?? ['ocp-apim-subscription-key']);
  const requests: ReceivedRequest[] = [];
  const tally = { total: 0, authorization: new Map<string, number>(), watched: 0 };

  const server = createServer((req, res) => {
    const received: ReceivedRequest = { method: req.method ?? '', url: req.url ?? '', headers: req.headers, rawHeaders: req.rawHeaders };
    tally.total++;
    const auth = req.headers.authorization ?? '<none>';
    tally.authorization.set(auth, (tally.authorization.get(auth) ?? 0) + 1);
    for (let i = 0; i < req.rawHeaders.length; i += 2) {
      if (watch.has(req.rawHeaders[i]!.toLowerCase())) {
        tally.watched++;
        break;
      }
    }
    if (keep > 0) {
      requests.push(received);
      if (requests.length > keep) requests.shift();
    }
    req.resume();
    req.on('end', () => {
      const body = JSON.stringify({ method: received.method, url: received.url, headers: received.headers });
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }).end(body);
    });
  });
  // Envoy keeps its upstream connections open; never let Node cut them first mid-test.
  server.keepAliveTimeout = 60_000;
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = `127.0.0.1:${(server.address() as AddressInfo).port}`;
  return {
    address,
    url: `http://${address}`,
    requests,
    tally,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Every value of a header as received, whatever the case of its name on the wire. */
export function headerValues(request: ReceivedRequest, name: string): string[] {
  const out: string[] = [];
  for (let i = 0; i < request.rawHeaders.length; i += 2) {
    if (request.rawHeaders[i]!.toLowerCase() === name) out.push(request.rawHeaders[i + 1]!);
  }
  return out;
}
