// Runs the bench's Envoy configs (bench/envoy/*.yaml) with their upstream ports filled in: every
// address stays 127.0.0.1, listeners and admin on port 0 (Envoy picks), read back from the admin.
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isDeepStrictEqual } from 'node:util';
import { fileURLToPath } from 'node:url';
import { parse, stringify } from 'yaml';
import { envoyStats, firstListenerPort } from '../test/helpers/envoy.ts';
import { track } from './cleanup.ts';

export const BENCH_ENVOY_DIR = fileURLToPath(new URL('./envoy/', import.meta.url));
const SHIPPED = fileURLToPath(new URL('../envoy/envoy.yaml', import.meta.url));

export interface BenchEnvoy {
  name: string;
  url: string;
  adminUrl: string;
  pid: number;
  /** Counters and gauges whose name matches `filter` (a regex). */
  stats(filter: string): Promise<Record<string, number>>;
  stop(): Promise<void>;
}

export interface StartOptions {
  bin: string;
  /** A file in bench/envoy/. */
  config: string;
  /** Cluster name → `127.0.0.1:PORT`. */
  clusters: Record<string, string>;
  /** Literal replacements in the file (e.g. the client id), applied before parsing. */
  replace?: Record<string, string>;
  /** Patches the parsed config, e.g. the token endpoint's uri. */
  patch?: (config: any) => void;
  concurrency: number;
}

export async function startBenchEnvoy(options: StartOptions): Promise<BenchEnvoy> {
  let text = readFileSync(join(BENCH_ENVOY_DIR, options.config), 'utf8');
  for (const [from, to] of Object.entries(options.replace ?? {})) text = text.replaceAll(from, to);
  const config = parse(text);
  for (const cluster of config.static_resources.clusters ?? []) {
    const target = options.clusters[cluster.name];
    if (target === undefined) throw new Error(`${options.config}: no address for cluster ${cluster.name}`);
    const i = target.lastIndexOf(':');
    for (const group of cluster.load_assignment.endpoints) {
      for (const lb of group.lb_endpoints) lb.endpoint.address.socket_address = { address: target.slice(0, i), port_value: Number(target.slice(i + 1)) };
    }
  }
  options.patch?.(config);
  const dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-bench-envoy-'));
  const file = join(dir, options.config);
  writeFileSync(file, stringify(config));
  const adminPath = join(dir, 'admin-address');
  const child = track(spawn(options.bin, [
    '--config-path', file,
    '--admin-address-path', adminPath,
    '--concurrency', String(options.concurrency),
    '--disable-hot-restart',
    '--log-level', 'error',
  ], { stdio: ['ignore', 'ignore', 'pipe'] }));
  const log: string[] = [];
  child.stderr!.on('data', (c: Buffer) => {
    log.push(c.toString('utf8'));
    if (log.length > 200) log.splice(0, 100);
  });
  let exited = false;
  const exit = new Promise<void>((resolve) => child.on('exit', () => {
    exited = true;
    resolve();
  }));
  const stop = async (): Promise<void> => {
    if (!exited) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exit;
      clearTimeout(timer);
    }
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const deadline = Date.now() + 20_000;
    let adminUrl: string | undefined;
    for (;;) {
      if (exited) throw new Error(`envoy (${options.config}) exited while starting:\n${log.join('')}`);
      if (Date.now() > deadline) throw new Error(`envoy (${options.config}) not ready within 20 s:\n${log.join('')}`);
      try {
        const address = readFileSync(adminPath, 'utf8').trim();
        if (address !== '') adminUrl = `http://${address}`;
      } catch {
        // not written yet
      }
      if (adminUrl !== undefined && (await fetch(`${adminUrl}/ready`).catch(() => undefined))?.status === 200) break;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const admin = adminUrl!;
    return {
      name: options.config,
      url: `http://127.0.0.1:${await firstListenerPort(admin)}`,
      adminUrl: admin,
      pid: child.pid!,
      stats: (filter) => envoyStats(admin, filter),
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

/**
 * What bench/envoy/extproc.yaml must share with the shipped envoy/envoy.yaml for (c) to measure
 * what users deploy; returns the differences (empty when none).
 */
export function extprocDrift(): string[] {
  const bench = parse(readFileSync(join(BENCH_ENVOY_DIR, 'extproc.yaml'), 'utf8'));
  const shipped = parse(readFileSync(SHIPPED, 'utf8'));
  const filter = (c: any): unknown => c.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters
    .find((f: any) => f.name === 'envoy.filters.http.ext_proc');
  const cluster = (c: any): any => c.static_resources.clusters.find((x: any) => x.name === 'oauth2_extproc');
  const checks: Array<[string, (c: any) => unknown]> = [
    ['the ext_proc filter', filter],
    ['the runtime layer', (c) => c.layered_runtime],
    ['the oauth2_extproc cluster protocol options', (c) => cluster(c).typed_extension_protocol_options],
    ['the oauth2_extproc cluster circuit breakers', (c) => cluster(c).circuit_breakers],
    ['the oauth2_extproc cluster connect_timeout', (c) => cluster(c).connect_timeout],
  ];
  return checks.filter(([, pick]) => !isDeepStrictEqual(pick(bench), pick(shipped))).map(([what]) => what);
}
