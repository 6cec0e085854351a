// The processes under test, started the way users start them: the sidecar as the container image
// runs it, `bin/oauth2-extproc.js` on the compiled dist/ (loading src/*.ts through Node's type
// stripping alone costs some 30 MB of RSS) with the image's NODE_OPTIONS, the bare server as its
// own process with the same NODE_OPTIONS; plus what the bench reads from them (RSS, Prometheus
// counters).
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import { ExtProcClient, requestHeaders, setHeaders, TYPICAL_HEADERS } from '../test/helpers/extproc-client.ts';
import type { OAuthServer } from '../test/helpers/oauth-server.ts';
import { profileFor, startSidecar, type SidecarProcess } from '../test/helpers/sidecar.ts';
import { track } from './cleanup.ts';

export type { SidecarProcess };

export interface SidecarOptions {
  idp: OAuthServer;
  workers: number;
  /** Extra profiles (name → profile fields) besides `default`. */
  profiles?: Record<string, Record<string, any>>;
  /** Fields added to every profile (e.g. refresh settings). */
  profileExtra?: Record<string, any>;
  /** Write a V8 CPU profile into this directory when the sidecar exits. */
  cpuProfDir?: string;
  /** NODE_OPTIONS for the sidecar; by default the container image's (IMAGE_NODE_OPTIONS). */
  nodeOptions?: string;
  waitReady?: boolean;
}

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const BIN = fileURLToPath(new URL('../bin/oauth2-extproc.js', import.meta.url));

/**
 * The heap flags the container image runs with (the Dockerfile's `ENV NODE_OPTIONS`), or
 * BENCH_NODE_OPTIONS: the bench measures the sidecar as it ships.
 */
export const IMAGE_NODE_OPTIONS = process.env.BENCH_NODE_OPTIONS ?? imageNodeOptions();

function imageNodeOptions(): string {
  const dockerfile = readFileSync(fileURLToPath(new URL('../Dockerfile', import.meta.url)), 'utf8');
  const m = /^ENV NODE_OPTIONS="([^"]*)"/m.exec(dockerfile);
  if (m === null) throw new Error('the Dockerfile sets no NODE_OPTIONS: set BENCH_NODE_OPTIONS');
  return m[1]!;
}

/** Compiles src/ into dist/ so the bench measures the code as it is now. */
export function buildSidecar(): void {
  const tsc = fileURLToPath(new URL('../node_modules/typescript/bin/tsc', import.meta.url));
  const built = spawnSync(process.execPath, [tsc, '-p', 'tsconfig.build.json'], { cwd: ROOT, stdio: 'inherit' });
  if (built.status !== 0) throw new Error('npm run build failed: the bench runs the compiled sidecar');
}

export function startBenchSidecar(o: SidecarOptions): Promise<SidecarProcess> {
  const profiles: Record<string, Record<string, any>> = { default: profileFor(o.idp, o.profileExtra) };
  for (const [name, extra] of Object.entries(o.profiles ?? {})) profiles[name] = profileFor(o.idp, { ...o.profileExtra, ...extra });
  const env: NodeJS.ProcessEnv = {};
  // NODE_OPTIONS rather than argv: the helper starts the CLI itself; --cpu-prof is allowed there.
  const nodeOptions = [process.env.NODE_OPTIONS ?? '', o.nodeOptions ?? IMAGE_NODE_OPTIONS];
  if (o.cpuProfDir !== undefined) nodeOptions.push('--cpu-prof', `--cpu-prof-dir=${o.cpuProfDir}`);
  if (nodeOptions.join('').trim() !== '') env.NODE_OPTIONS = nodeOptions.join(' ').trim();
  const started = startSidecar({
    // The production defaults (logging at info), as a user runs it.
    config: { server: { workers: o.workers, shutdownGraceSeconds: 2 }, profiles },
    env,
    entry: BIN,
    waitReady: o.waitReady ?? true,
  });
  return started.then((s) => {
    track(s.child);
    return s;
  });
}

export interface BareServer {
  address: string;
  pid: number;
  stop(): Promise<void>;
}

const BARE = fileURLToPath(new URL('./bare-server.ts', import.meta.url));

export async function startBareProcess(authorizationLength: number, options: { cpuProfDir?: string } = {}): Promise<BareServer> {
  const flags = options.cpuProfDir === undefined ? [] : ['--cpu-prof', `--cpu-prof-dir=${options.cpuProfDir}`];
  // The same heap flags as the sidecar: the comparison is about the code, not V8's heap sizing.
  const env = { ...process.env, NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} ${IMAGE_NODE_OPTIONS}`.trim() };
  const child: ChildProcess = track(spawn(process.execPath, [...flags, BARE, '--listen', '127.0.0.1:0', '--authorization-length', String(authorizationLength)], { stdio: ['ignore', 'pipe', 'inherit'], env }));
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  const address = await new Promise<string>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error('bare server did not start within 15 s')), 15_000);
    child.stdout!.on('data', (c: Buffer) => {
      out += c.toString('utf8');
      const line = out.split('\n')[0];
      if (out.includes('\n') && line !== undefined) {
        clearTimeout(timer);
        resolve((JSON.parse(line) as { listening: string }).listening);
      }
    });
    child.on('exit', (code) => reject(new Error(`bare server exited (${code})`)));
  });
  return {
    address,
    pid: child.pid!,
    async stop() {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/** A process and its descendants (the sidecar's workers), from /proc. */
function processTree(pid: number): number[] {
  const out: number[] = [];
  const visit = (p: number): void => {
    if (out.includes(p)) return;
    out.push(p);
    try {
      for (const task of readdirSync(`/proc/${p}/task`)) {
        for (const child of readFileSync(`/proc/${p}/task/${task}/children`, 'utf8').trim().split(/\s+/)) {
          if (child !== '') visit(Number(child));
        }
      }
    } catch {
      // The process is gone.
    }
  };
  visit(pid);
  return out;
}

/** VmRSS of a process and of its child processes (the sidecar's workers), in bytes. */
export function rssBytes(pid: number): number {
  return memoryOf(pid).rss;
}

/**
 * Resident memory of a process tree from /proc/PID/status: all of it (VmRSS), and the anonymous
 * part (RssAnon: the heaps and native allocations; the rest is mostly the node binary's pages).
 */
export function memoryOf(pid: number): { rss: number; anon: number } {
  const out = { rss: 0, anon: 0 };
  for (const p of processTree(pid)) {
    try {
      const status = readFileSync(`/proc/${p}/status`, 'utf8');
      out.rss += Number(/^VmRSS:\s+(\d+) kB/m.exec(status)?.[1] ?? 0) * 1024;
      out.anon += Number(/^RssAnon:\s+(\d+) kB/m.exec(status)?.[1] ?? 0) * 1024;
    } catch {
      // gone
    }
  }
  return out;
}

/** CPU time (user + system) used so far by a process and its descendants, in seconds. */
export function cpuSeconds(pid: number): number {
  let ticks = 0;
  for (const p of processTree(pid)) {
    try {
      // Fields after the command name (which may hold spaces): utime and stime are 12th and 13th.
      const stat = readFileSync(`/proc/${p}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      ticks += Number(fields[11]) + Number(fields[12]);
    } catch {
      // gone
    }
  }
  return ticks / CLOCK_TICKS;
}

// USER_HZ: 100 on every Linux this runs on (getconf CLK_TCK).
const CLOCK_TICKS = 100;

/** Sums of the sidecar's Prometheus samples by metric name and label string. */
export async function scrape(adminUrl: string): Promise<Map<string, number>> {
  const text = await (await fetch(`${adminUrl}/metrics`)).text();
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line.startsWith('#') || line === '') continue;
    const m = /^(\S+?)(\{.*\})?\s+(\S+)$/.exec(line);
    if (m !== null) out.set(`${m[1]}${m[2] ?? ''}`, Number(m[3]));
  }
  return out;
}

/** `oauth2_extproc_requests_total` by outcome, over every profile. */
export async function requestOutcomes(adminUrl: string): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const [key, value] of await scrape(adminUrl)) {
    const m = /^oauth2_extproc_requests_total\{.*outcome="([^"]+)"/.exec(key);
    if (m !== null) out[m[1]!] = (out[m[1]!] ?? 0) + value;
  }
  return out;
}

/**
 * One ext_proc stream the way h2load sends it (the request_headers message, then half-close),
 * through grpc-js with the canonical Envoy protos: the gRPC status and the reply, so the bench
 * knows it measures the success path and not an error.
 */
export async function checkReply(address: string, profile?: string): Promise<{ code: number; authorization: string | undefined; removed: string[]; kind: string }> {
  const client = new ExtProcClient(address);
  try {
    const { reply, status } = await client.exchange(requestHeaders(TYPICAL_HEADERS), { profile, then: 'half-close' });
    return {
      code: status?.code ?? -1,
      kind: String(reply.response),
      authorization: setHeaders(reply).authorization,
      removed: reply.request_headers?.response?.header_mutation?.remove_headers ?? [],
    };
  } catch (err) {
    return { code: (err as grpc.ServiceError).code ?? -1, kind: 'error', authorization: undefined, removed: [] };
  } finally {
    client.close();
  }
}
