#!/usr/bin/env node
// V8 CPU profiles (`--cpu-prof`) of the sidecar and of the bare grpc-js server under the same
// h2load load, cut to the measured window (both use the monotonic clock, so samples are matched
// to the time h2load ran), and compared per stream: what the sidecar's own code adds, and where.
// Part of `npm run bench`; alone:
//   npx node bench/profile.ts [--seconds 10] [--streams 16] [--workers N]
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { fmt, skipped, table, type BenchContext, type Section } from './context.ts';
import { EXT_PROC_PATH, GRPC_HEADERS, writeRequestFrame } from './grpc-frame.ts';
import { buildSidecar, startBareProcess, startBenchSidecar } from './processes.ts';
import { assertSuccessPath } from './sidecar-alone.ts';
import { findTools, h2load } from './tools.ts';
import { startOAuthServer, type OAuthServer } from '../test/helpers/oauth-server.ts';

const ROOT = fileURLToPath(new URL('../', import.meta.url));
const WARMUP_SECONDS = 1;

interface CpuProfile {
  nodes: Array<{ id: number; callFrame: { functionName: string; url: string; lineNumber: number } }>;
  startTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface FunctionCost {
  name: string;
  where: string;
  group: string;
  ms: number;
}

export interface ProfileSummary {
  /** Sampled time inside the window, ms, and how much of it was not idle. */
  totalMs: number;
  busyMs: number;
  /** False when no sample fell in the window and the whole profile was used. */
  windowed: boolean;
  functions: Map<string, FunctionCost>;
  groups: Map<string, number>;
}

/** Who owns a frame: the project's src/, a dependency, a part of Node, or V8 itself. */
function groupOf(url: string, name: string): string {
  if (url === '') {
    if (name === '(garbage collector)') return 'V8 garbage collector';
    if (name === '(idle)') return 'idle';
    if (name === '(program)') return 'V8 (program: native, not attributed)';
    return 'native functions';
  }
  if (url.startsWith('node:')) {
    const area = url.replace(/^node:(internal\/)?/, '').split('/')[0]!;
    return /^(http2|net|stream|streams|stream_base_commons)$/.test(area) ? 'Node http2/net/streams' : `Node ${area}`;
  }
  const rel = relative(ROOT, url.startsWith('file://') ? fileURLToPath(url) : url);
  // The sidecar runs compiled (dist/ is src/ with the types stripped, line for line close).
  if (rel.startsWith('src/') || rel.startsWith('dist/')) return 'oauth2-extproc src/';
  if (rel.startsWith('bench/')) return 'bench/ (bare server)';
  return /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(rel)?.[1] ?? rel;
}

/** Self time per function and per owner, from the samples taken between `fromUs` and `toUs`. */
export function summarizeProfiles(files: readonly string[], fromUs = 0, toUs = Number.POSITIVE_INFINITY): ProfileSummary {
  const pass = (from: number, to: number): ProfileSummary => {
    const out: ProfileSummary = { totalMs: 0, busyMs: 0, windowed: true, functions: new Map(), groups: new Map() };
    for (const file of files) {
      const profile = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
      const byId = new Map(profile.nodes.map((n) => [n.id, n]));
      let t = profile.startTime;
      for (let i = 0; i < profile.samples.length; i++) {
        const delta = profile.timeDeltas[i] ?? 0;
        t += delta;
        const node = byId.get(profile.samples[i]!);
        if (node === undefined || t < from || t > to) continue;
        const ms = delta / 1000;
        out.totalMs += ms;
        const { functionName, url, lineNumber } = node.callFrame;
        const group = groupOf(url, functionName);
        if (group === 'idle') continue;
        out.busyMs += ms;
        out.groups.set(group, (out.groups.get(group) ?? 0) + ms);
        const path = url.startsWith('file://') ? relative(ROOT, fileURLToPath(url)) : url;
        const where = url === '' ? '' : `${path.replace(/^node_modules\//, '')}:${lineNumber + 1}`;
        const name = functionName === '' ? '(anonymous)' : functionName;
        const key = `${name} ${where}`;
        const entry = out.functions.get(key) ?? { name, where, group, ms: 0 };
        entry.ms += ms;
        out.functions.set(key, entry);
      }
    }
    return out;
  };
  const windowed = pass(fromUs, toUs);
  if (windowed.busyMs > 0) return windowed;
  return { ...pass(0, Number.POSITIVE_INFINITY), windowed: false };
}

interface Profiled {
  summary: ProfileSummary;
  /** Streams h2load completed in the window. */
  streams: number;
  rps: number;
}

/** Runs h2load against `address` and returns the window it measured, on the monotonic clock (µs). */
async function load(ctx: BenchContext, bin: string, address: string, streams: number): Promise<{ fromUs: number; toUs: number; streams: number; rps: number }> {
  const frame = writeRequestFrame(ctx.dir);
  const start = process.hrtime.bigint();
  const result = await h2load(bin, {
    url: `http://${address}${EXT_PROC_PATH}`, clients: ctx.workers > 1 ? ctx.workers * 2 : 1, streams,
    seconds: ctx.profileSeconds, warmupSeconds: WARMUP_SECONDS, dataFile: frame.file, headers: GRPC_HEADERS, logFile: join(ctx.dir, 'h2load-prof.log'),
  });
  const fromUs = Number(start / 1000n) + WARMUP_SECONDS * 1e6;
  return { fromUs, toUs: fromUs + ctx.profileSeconds * 1e6, streams: result.requests, rps: result.rps };
}

function profilesIn(dir: string): string[] {
  return readdirSync(dir).filter((f) => f.endsWith('.cpuprofile')).map((f) => join(dir, f));
}

export async function profileSidecar(ctx: BenchContext, idp: OAuthServer, options: { streams?: number } = {}): Promise<Section> {
  const title = 'Where the CPU goes: the sidecar against the bare server, per stream';
  const bin = ctx.tools.h2load.bin;
  if (bin === undefined) return skipped('profile', title, `h2load is missing (${ctx.tools.h2load.install}).`);
  const streams = options.streams ?? 16;
  const sidecarDir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-cpuprof-'));
  const bareDir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-cpuprof-bare-'));
  try {
    let authorizationLength = 0;
    const sidecar = await startBenchSidecar({ idp, workers: ctx.workers, cpuProfDir: sidecarDir });
    let sidecarLoad;
    try {
      authorizationLength = Buffer.byteLength(await assertSuccessPath('oauth2-extproc', sidecar.grpcAddress));
      sidecarLoad = await load(ctx, bin, sidecar.grpcAddress, streams);
    } finally {
      await sidecar.stop();
    }
    const bare = await startBareProcess(authorizationLength, { cpuProfDir: bareDir });
    let bareLoad;
    try {
      bareLoad = await load(ctx, bin, bare.address, streams);
    } finally {
      await bare.stop();
    }
    const a: Profiled = { summary: summarizeProfiles(profilesIn(sidecarDir), sidecarLoad.fromUs, sidecarLoad.toUs), streams: sidecarLoad.streams, rps: sidecarLoad.rps };
    const b: Profiled = { summary: summarizeProfiles(profilesIn(bareDir), bareLoad.fromUs, bareLoad.toUs), streams: bareLoad.streams, rps: bareLoad.rps };
    if (a.summary.busyMs === 0) return skipped('profile', title, 'the sidecar wrote no CPU profile.');

    const us = (p: Profiled, ms: number | undefined): number => ((ms ?? 0) * 1000) / p.streams;
    const fmtUs = (n: number): string => n.toFixed(2);
    const signedUs = (n: number): string => `${n >= 0 ? '+' : '−'}${Math.abs(n).toFixed(2)}`;
    const pct = (ms: number): string => `${((ms / a.summary.busyMs) * 100).toFixed(1)} %`;
    const groups = [...new Set([...a.summary.groups.keys(), ...b.summary.groups.keys()])]
      .map((g) => ({ g, a: us(a, a.summary.groups.get(g)), b: us(b, b.summary.groups.get(g)) }))
      .sort((x, y) => y.a - x.a)
      .slice(0, 12);
    const top = [...a.summary.functions.values()].sort((x, y) => y.ms - x.ms).slice(0, 15);
    const extra = [...a.summary.functions.entries()]
      .map(([key, f]) => ({ f, d: us(a, f.ms) - us(b, b.summary.functions.get(key)?.ms) }))
      .sort((x, y) => y.d - x.d)
      .slice(0, 12);
    const own = [...a.summary.functions.values()].filter((f) => f.group === 'oauth2-extproc src/').sort((x, y) => y.ms - x.ms).slice(0, 10);
    const busyA = us(a, a.summary.busyMs);
    const busyB = us(b, b.summary.busyMs);
    ctx.log(`  profile: ${fmtUs(busyA)} µs CPU per stream (sidecar) vs ${fmtUs(busyB)} µs (bare); src/ ${pct(a.summary.groups.get('oauth2-extproc src/') ?? 0)} of the sidecar's busy time`);

    const markdown = [
      `### ${title}`,
      '',
      `Each server run with \`--cpu-prof\` while h2load sends ext_proc streams (-m ${streams}) for ${WARMUP_SECONDS} s of warm-up and ${ctx.profileSeconds} s measured; ` +
        `only samples from the measured ${ctx.profileSeconds} s count${a.summary.windowed && b.summary.windowed ? '' : ' (**the window could not be matched: whole profiles**)'}. ` +
        `Under the profiler the sidecar served ${fmt.int(a.rps)} streams/s and the bare server ${fmt.int(b.rps)}/s. ` +
        `CPU (busy, not idle) per stream: **${fmtUs(busyA)} µs** for the sidecar, **${fmtUs(busyB)} µs** for the bare server (${signedUs(busyA - busyB)} µs).`,
      '',
      'By owner of the code, self time in µs per stream:',
      '',
      table(['owner', 'oauth2-extproc', 'bare', 'difference'], groups.map((g) => [g.g, fmtUs(g.a), fmtUs(g.b), signedUs(g.a - g.b)])),
      '',
      'The sidecar\'s top functions by self time (share of its busy time):',
      '',
      table(['function', 'where', 'self time', 'µs/stream', 'bare µs/stream'], top.map((f) => [
        `\`${f.name}\``, f.where === '' ? '' : `\`${f.where}\``, pct(f.ms), fmtUs(us(a, f.ms)), fmtUs(us(b, b.summary.functions.get(`${f.name} ${f.where}`)?.ms)),
      ])),
      '',
      'Functions that cost the sidecar the most more than the bare server, µs per stream:',
      '',
      table(['function', 'where', 'extra µs/stream'], extra.map(({ f, d }) => [`\`${f.name}\``, f.where === '' ? '' : `\`${f.where}\``, signedUs(d)])),
      '',
      'The project\'s own functions (src/):',
      '',
      own.length === 0 ? 'none sampled' : table(['function', 'where', 'self time', 'µs/stream'], own.map((f) => [`\`${f.name}\``, `\`${f.where}\``, pct(f.ms), fmtUs(us(a, f.ms))])),
      '',
    ].join('\n');
    return { id: 'profile', markdown };
  } finally {
    rmSync(sidecarDir, { recursive: true, force: true });
    rmSync(bareDir, { recursive: true, force: true });
  }
}

if (import.meta.main) {
  const { values } = parseArgs({ options: { seconds: { type: 'string' }, streams: { type: 'string' }, workers: { type: 'string' } } });
  buildSidecar();
  const dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-bench-'));
  const idp = await startOAuthServer();
  try {
    const ctx: BenchContext = {
      tools: findTools(), seconds: 0, rounds: 0, rate: 0, soakSeconds: 0, envoyConcurrency: 0,
      workers: Number(values.workers ?? 1), profileSeconds: Number(values.seconds ?? 10), dir,
      log: (line) => console.log(line),
    };
    const section = await profileSidecar(ctx, idp, { streams: Number(values.streams ?? 16) });
    console.log(section.markdown);
  } finally {
    await idp.close();
    rmSync(dir, { recursive: true, force: true });
  }
}
