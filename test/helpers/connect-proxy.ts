// A minimal forward proxy on 127.0.0.1 for tests: HTTPS through CONNECT tunnels and plain HTTP
// in absolute form (RFC 9110 §9.3.6, RFC 9112 §3.2.2), as corporate proxies behave. It counts
// what went through it; it never looks inside a tunnel.
import { createServer, request, type IncomingMessage, type Server } from 'node:http';
import { connect, type AddressInfo, type Socket } from 'node:net';

export interface ConnectProxy {
  url: string;
  /** `host:port` of every CONNECT, in order. */
  tunnels: string[];
  /** Absolute URLs of every plain HTTP request forwarded. */
  forwarded: string[];
  /** Proxy-Authorization headers seen (tests only). */
  proxyAuthorizations: string[];
  close(): Promise<void>;
}

export async function startConnectProxy(): Promise<ConnectProxy> {
  const tunnels: string[] = [];
  const forwarded: string[] = [];
  const proxyAuthorizations: string[] = [];
  const sockets = new Set<Socket>();
  const server: Server = createServer((req, res) => {
    record(req);
    forwarded.push(req.url ?? '');
    const target = new URL(req.url ?? '');
    const upstream = request(target, { method: req.method, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.headers);
      answer.pipe(res);
    });
    upstream.on('error', () => res.writeHead(502).end());
    req.pipe(upstream);
  });
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  server.on('connect', (req: IncomingMessage, client: Socket, head: Buffer) => {
    record(req);
    tunnels.push(req.url ?? '');
    const [host, port] = (req.url ?? '').split(':');
    const upstream = connect(Number(port), host ?? '', () => {
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
      if (head.length > 0) upstream.write(head);
      upstream.pipe(client);
      client.pipe(upstream);
    });
    sockets.add(upstream);
    upstream.on('close', () => sockets.delete(upstream));
    upstream.on('error', () => client.destroy());
    client.on('error', () => upstream.destroy());
  });
  function record(req: IncomingMessage): void {
    const auth = req.headers['proxy-authorization'];
    if (auth !== undefined) proxyAuthorizations.push(auth);
  }
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    tunnels,
    forwarded,
    proxyAuthorizations,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
