// Memory: the sidecar's RSS (VmRSS, workers included) after a warm-up at a steady rate, then
// through a sustained run at the same rate, sampled every few seconds. Through Envoy (c) when
// Envoy is there (its connection churn and stream ends are part of what could leak), else with
// h2load straight to the sidecar.
import { join } from 'node:path';
import { fmt, skipped, table, type BenchContext, type Section } from './context.ts';
import { startBenchEnvoy, type BenchEnvoy } from './envoy.ts';
import { EXT_PROC_PATH, GRPC_HEADERS, writeRequestFrame } from './grpc-frame.ts';
import { requestOutcomes, rssBytes, scrape, startBenchSidecar } from './processes.ts';
import { CALLER_HEADERS } from './through-envoy.ts';
import { h2load, type LoadResult } from './tools.ts';
import type { OAuthServer } from '../test/helpers/oauth-server.ts';

const WARMUP_SECONDS = 15;
const SAMPLE_EVERY_MS = 5000;
const CLIENTS = 10;

export async function memory(ctx: BenchContext, idp: OAuthServer, backend: BenchEnvoy | undefined): Promise<Section> {
  const title = 'Memory: RSS after warm-up and after a sustained run';
  const h2 = ctx.tools.h2load.bin;
  if (h2 === undefined) return skipped('memory', title, `h2load is missing (${ctx.tools.h2load.install}).`);
  const sidecar = await startBenchSidecar({ idp, workers: ctx.workers });
  let envoy: BenchEnvoy | undefined;
  try {
    if (ctx.tools.envoy.bin !== undefined && backend !== undefined) {
      envoy = await startBenchEnvoy({
        bin: ctx.tools.envoy.bin, config: 'extproc.yaml', concurrency: ctx.envoyConcurrency,
        clusters: { backend: backend.url.slice('http://'.length), oauth2_extproc: sidecar.grpcAddress },
      });
    }
    const frame = writeRequestFrame(ctx.dir);
    const load = (seconds: number): Promise<LoadResult> => envoy !== undefined
      ? h2load(h2, { url: `${envoy.url}/orders/42?expand=lines`, h1: true, clients: CLIENTS, streams: 1, rpsPerClient: ctx.rate / CLIENTS, seconds, headers: CALLER_HEADERS, logFile: join(ctx.dir, 'h2load-soak.log') })
      : h2load(h2, { url: `http://${sidecar.grpcAddress}${EXT_PROC_PATH}`, clients: 1, streams: CLIENTS, rpsPerClient: ctx.rate, seconds, dataFile: frame.file, headers: GRPC_HEADERS, logFile: join(ctx.dir, 'h2load-soak.log') });
    const heapUsed = async (): Promise<number> => {
      let sum = 0;
      for (const [k, v] of await scrape(sidecar.adminUrl)) if (k.startsWith('oauth2_extproc_nodejs_heap_size_used_bytes')) sum += v;
      return sum;
    };

    const idle = rssBytes(sidecar.child.pid!);
    const warm = await load(WARMUP_SECONDS);
    const warmRss = rssBytes(sidecar.child.pid!);
    const warmHeap = await heapUsed();
    const samples: Array<{ t: number; rss: number }> = [];
    const started = Date.now();
    const timer = setInterval(() => samples.push({ t: (Date.now() - started) / 1000, rss: rssBytes(sidecar.child.pid!) }), SAMPLE_EVERY_MS);
    let soak: LoadResult;
    try {
      soak = await load(ctx.soakSeconds);
    } finally {
      clearInterval(timer);
    }
    const endRss = rssBytes(sidecar.child.pid!);
    const endHeap = await heapUsed();
    const outcomes = await requestOutcomes(sidecar.adminUrl);
    const peak = Math.max(endRss, ...samples.map((s) => s.rss));
    const requests = warm.requests + soak.requests;
    const growthPer100k = ((endRss - warmRss) / soak.requests) * 100_000;
    ctx.log(`  memory: idle ${fmt.mb(idle)} MB, warm ${fmt.mb(warmRss)} MB, after ${ctx.soakSeconds} s ${fmt.mb(endRss)} MB, peak ${fmt.mb(peak)} MB`);
    const quartiles = [0.25, 0.5, 0.75].map((q) => samples[Math.floor(q * samples.length)]).filter((s) => s !== undefined);
    const markdown = [
      `### ${title}`,
      '',
      `${envoy !== undefined ? `Through Envoy (c), h2load --h1 ${CLIENTS} connections` : `h2load straight to the sidecar (Envoy is missing: ${ctx.tools.envoy.install})`} at ` +
        `${fmt.int(ctx.rate)} requests/s: ${WARMUP_SECONDS} s of warm-up, then ${ctx.soakSeconds} s (BENCH_SOAK_SECONDS; the issue's figure is 300). ` +
        `The sidecar${ctx.workers > 1 ? ` (${ctx.workers} workers, RSS summed over all its processes)` : ''} answered ${fmt.int(outcomes.injected ?? 0)} streams with the token ` +
        `(${fmt.int(requests)} requests sent, ${warm.failures + soak.failures} not 2xx). RSS from /proc/PID/status (VmRSS), heap from the sidecar's own /metrics.`,
      '',
      table(['when', 'RSS (MB)', 'V8 heap used (MB)'], [
        ['started, idle', fmt.mb(idle), ''],
        [`after ${WARMUP_SECONDS} s warm-up`, fmt.mb(warmRss), fmt.mb(warmHeap)],
        ...quartiles.map((s) => [`soak, ${Math.round(s!.t)} s`, fmt.mb(s!.rss), '']),
        [`after ${ctx.soakSeconds} s soak`, fmt.mb(endRss), fmt.mb(endHeap)],
        ['peak during the soak', fmt.mb(peak), ''],
      ]),
      '',
      `Change from warm-up to the end: ${endRss >= warmRss ? '+' : '−'}${fmt.mb(Math.abs(endRss - warmRss))} MB over ${fmt.int(soak.requests)} requests ` +
        `(${(growthPer100k / 1024).toFixed(1)} KiB per 100,000 requests). Target ≤ 100 MB: peak ${fmt.mb(peak)} MB (${peak <= 100 * 1024 * 1024 ? 'met' : 'missed'}).`,
      '',
    ].join('\n');
    return { id: 'memory', markdown };
  } finally {
    await envoy?.stop();
    await sidecar.stop();
  }
}
