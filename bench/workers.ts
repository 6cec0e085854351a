// Using more than one core: the sidecar with `server.workers: 1` and with one worker per core,
// side by side under the same h2load load, in alternating turns. Connections (not streams) are
// spread over the workers, so the load uses several connections. The token endpoint is read from
// the sidecar's own metrics: the whole sidecar, however many workers, must have fetched once.
import { cpus } from 'node:os';
import { join } from 'node:path';
import { fmt, skipped, table, type BenchContext, type Section } from './context.ts';
import { EXT_PROC_PATH, GRPC_HEADERS, writeRequestFrame } from './grpc-frame.ts';
import { cpuSeconds, requestOutcomes, scrape, startBenchSidecar, type SidecarProcess } from './processes.ts';
import { assertSuccessPath } from './sidecar-alone.ts';
import { h2load, median, type LoadResult } from './tools.ts';
import type { OAuthServer } from '../test/helpers/oauth-server.ts';

const CONNECTIONS_PER_WORKER = 2;
const STREAMS_PER_CONNECTION = 16;

interface Subject {
  workers: number;
  sidecar: SidecarProcess;
  runs: Array<LoadResult & { cpuPerRequestUs: number }>;
}

async function tokenFetches(sidecar: SidecarProcess): Promise<number> {
  let n = 0;
  for (const [k, v] of await scrape(sidecar.adminUrl)) if (k.startsWith('oauth2_extproc_token_fetches_total{')) n += v;
  return n;
}

export async function workerScaling(ctx: BenchContext, idp: OAuthServer): Promise<Section> {
  const title = 'Using more than one core: server.workers';
  const bin = ctx.tools.h2load.bin;
  if (bin === undefined) return skipped('workers', title, `h2load is missing (${ctx.tools.h2load.install}).`);
  const most = Math.max(2, cpus().length);
  const subjects: Subject[] = [];
  try {
    for (const workers of [1, most]) {
      const sidecar = await startBenchSidecar({ idp, workers });
      await assertSuccessPath(`oauth2-extproc (${workers} workers)`, sidecar.grpcAddress);
      subjects.push({ workers, sidecar, runs: [] });
    }
    const frame = writeRequestFrame(ctx.dir);
    const clients = most * CONNECTIONS_PER_WORKER;
    const run = async (s: Subject, seconds: number, warmup: number): Promise<LoadResult & { cpuPerRequestUs: number }> => {
      const cpuBefore = cpuSeconds(s.sidecar.child.pid!);
      const r = await h2load(bin, {
        url: `http://${s.sidecar.grpcAddress}${EXT_PROC_PATH}`,
        clients,
        streams: STREAMS_PER_CONNECTION,
        seconds,
        warmupSeconds: warmup,
        dataFile: frame.file,
        headers: GRPC_HEADERS,
        logFile: join(ctx.dir, 'h2load-workers.log'),
      });
      if (r.failures > 0) throw new Error(`${s.workers} workers: ${r.failures} of ${r.requests} h2load requests failed`);
      // CPU over warm-up and measured seconds alike, per request sent in both.
      const cpu = cpuSeconds(s.sidecar.child.pid!) - cpuBefore;
      return { ...r, cpuPerRequestUs: (cpu * 1e6) / (r.rps * (seconds + warmup)) };
    };
    for (const s of subjects) await run(s, 2, 0); // JIT warm-up of every worker
    const before = await Promise.all(subjects.map((s) => requestOutcomes(s.sidecar.adminUrl)));
    for (let round = 0; round < ctx.rounds; round++) {
      const order = round % 2 === 0 ? subjects : [...subjects].reverse();
      for (const s of order) s.runs.push(await run(s, ctx.seconds, 0.5));
      ctx.log(`  round ${round + 1}: ${subjects.map((s) => `${s.workers} worker(s) ${fmt.int(s.runs.at(-1)!.rps)}/s`).join(', ')}`);
    }
    const after = await Promise.all(subjects.map((s) => requestOutcomes(s.sidecar.adminUrl)));
    const fetches = await Promise.all(subjects.map((s) => tokenFetches(s.sidecar)));
    const base = subjects[0]!;
    const ratios = (s: Subject): number[] => s.runs.map((r, i) => r.rps / base.runs[i]!.rps);
    const rows = subjects.map((s, i) => {
      const injected = (after[i]!.injected ?? 0) - (before[i]!.injected ?? 0);
      const sent = s.runs.reduce((n, r) => n + r.requests, 0);
      if (injected < sent) throw new Error(`${s.workers} workers: ${sent} streams measured, ${injected} counted as injected`);
      return [
        String(s.workers),
        fmt.int(median(s.runs.map((r) => r.rps))),
        `**${fmt.ratio(median(ratios(s)))}**`,
        ratios(s).map(fmt.ratio).join(', '),
        fmt.int(median(s.runs.map((r) => r.cpuPerRequestUs))),
        String(fetches[i]),
      ];
    });
    const markdown = [
      `### ${title}`,
      '',
      `h2load, ${clients} HTTP/2 connections × ${STREAMS_PER_CONNECTION} concurrent streams (the primary process hands connections to the workers in turn, so each worker gets ${CONNECTIONS_PER_WORKER} or more), ` +
        `the same ext_proc message as above, to a sidecar with \`server.workers: 1\` and one with \`server.workers: ${most}\` (${cpus().length} CPUs here). ` +
        `${ctx.rounds} rounds of ${ctx.seconds} s per sidecar, alternating, the first to go changing every round; every measured stream was counted as \`injected\`. ` +
        'CPU is the whole process tree (primary and workers) per request, from /proc/PID/stat. Token requests are the sidecar\'s own ' +
        '`oauth2_extproc_token_fetches_total` at the end of the part: with several workers the primary alone fetches and hands the token to them.',
      '',
      table(['server.workers', 'streams/s', 'vs 1 worker (median)', 'per round', 'CPU µs/stream', 'token requests'], rows),
      '',
    ].join('\n');
    return { id: 'workers', markdown };
  } finally {
    for (const s of subjects) await s.sidecar.stop();
  }
}
