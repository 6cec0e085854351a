// Admin HTTP: /healthz (the process is up), /readyz (ready to serve Envoy), /metrics (Prometheus).
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Readiness } from './health.ts';
import type { Logger } from './logger.ts';

export async function startAdminServer(options: {
  address: string;
  readiness: Readiness;
  /** The Prometheus exposition (one process's registry, or every worker's aggregated). */
  metricsText: () => Promise<string>;
  contentType: string;
  logger: Logger;
}): Promise<{ server: Server; port: number }> {
  const { readiness, metricsText, contentType, logger } = options;
  const server = createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD' }).end();
      return;
    }
    if (path === '/healthz') {
      res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
    } else if (path === '/readyz') {
      const details = readiness.check();
      res.writeHead(details.ready ? 200 : 503, { 'content-type': 'application/json' }).end(`${JSON.stringify(details)}\n`);
    } else if (path === '/metrics') {
      metricsText().then(
        (text) => res.writeHead(200, { 'content-type': contentType }).end(text),
        (err: Error) => {
          logger.error({ error: { message: err.message } }, 'metrics collection failed');
          res.writeHead(500).end();
        },
      );
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /healthz, /readyz or /metrics\n');
    }
  });
  server.keepAliveTimeout = 5000;
  const { host, port } = splitHostPort(options.address);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  return { server, port: (server.address() as AddressInfo).port };
}

export function splitHostPort(address: string): { host: string; port: number } {
  const i = address.lastIndexOf(':');
  const host = address.slice(0, i).replace(/^\[(.*)\]$/, '$1');
  return { host, port: Number(address.slice(i + 1)) };
}
