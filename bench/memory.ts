// Memory: the sidecar's resident memory after a warm-up at a steady rate, then through a sustained
// run at the same rate, sampled every few seconds. Two sidecars side by side under the same load:
// one with Node's default heap sizing, which on a machine with a lot of RAM lets garbage pile up
// before collecting it, and one with the heap flags the container image sets (NODE_OPTIONS in
// the Dockerfile): if RSS stays flat for the whole run, nothing grows per request. Through Envoy (c)
// when Envoy is there (its connections and stream ends are part of what could leak), else with
// h2load straight to the sidecars.
import { join } from 'node:path';
import { fmt, skipped, table, type BenchContext, type Section } from './context.ts';
import { startBenchEnvoy, type BenchEnvoy } from './envoy.ts';
import { EXT_PROC_PATH, GRPC_HEADERS, writeRequestFrame } from './grpc-frame.ts';
import { cpuSeconds, IMAGE_NODE_OPTIONS, memoryOf, requestOutcomes, scrape, startBenchSidecar, type SidecarProcess } from './processes.ts';
import { CALLER_HEADERS } from './through-envoy.ts';
import { h2load, type LoadResult } from './tools.ts';
import type { OAuthServer } from '../test/helpers/oauth-server.ts';

const WARMUP_SECONDS = 15;
const SAMPLE_EVERY_MS = 5000;
const CLIENTS = 2; // see RATE_CLIENTS in through-envoy.ts
interface Subject {
  name: string;
  sidecar: SidecarProcess;
  envoy: BenchEnvoy | undefined;
  load?: LoadResult[];
  samples: Array<{ t: number; rss: number; anon: number }>;
  /** CPU seconds of the sidecar at the start and at the end of the soak. */
  cpu?: { start: number; end: number };
  idle: { rss: number; anon: number };
  warm?: { rss: number; anon: number; heap: number };
  end?: { rss: number; anon: number; heap: number };
}

async function heapUsed(sidecar: SidecarProcess): Promise<number> {
  let sum = 0;
  for (const [k, v] of await scrape(sidecar.adminUrl)) if (k.startsWith('oauth2_extproc_nodejs_heap_size_used_bytes')) sum += v;
  return sum;
}

export async function memory(ctx: BenchContext, idp: OAuthServer, backend: BenchEnvoy | undefined): Promise<Section> {
  const title = 'Memory: resident set after warm-up and after a sustained run';
  const h2 = ctx.tools.h2load.bin;
  if (h2 === undefined) return skipped('memory', title, `h2load is missing (${ctx.tools.h2load.install}).`);
  const subjects: Subject[] = [];
  try {
    for (const [name, nodeOptions] of [['Node defaults', ''], [`as in the image (${IMAGE_NODE_OPTIONS})`, IMAGE_NODE_OPTIONS]] as const) {
      const sidecar = await startBenchSidecar({ idp, workers: ctx.workers, nodeOptions });
      const envoy = ctx.tools.envoy.bin !== undefined && backend !== undefined
        ? await startBenchEnvoy({
          bin: ctx.tools.envoy.bin, config: 'extproc.yaml', concurrency: ctx.envoyConcurrency,
          clusters: { backend: backend.url.slice('http://'.length), oauth2_extproc: sidecar.grpcAddress },
        })
        : undefined;
      subjects.push({ name, sidecar, envoy, samples: [], idle: memoryOf(sidecar.child.pid!) });
    }
    const frame = writeRequestFrame(ctx.dir);
    const load = (s: Subject, i: number, seconds: number): Promise<LoadResult> => s.envoy !== undefined
      ? h2load(h2, { url: `${s.envoy.url}/orders/42?expand=lines`, h1: true, clients: CLIENTS, streams: 1, rpsPerClient: ctx.rate / CLIENTS, seconds, headers: CALLER_HEADERS, logFile: join(ctx.dir, `h2load-soak-${i}.log`) })
      : h2load(h2, { url: `http://${s.sidecar.grpcAddress}${EXT_PROC_PATH}`, clients: 1, streams: 4, rpsPerClient: ctx.rate, seconds, dataFile: frame.file, headers: GRPC_HEADERS, logFile: join(ctx.dir, `h2load-soak-${i}.log`) });
    const snapshot = async (s: Subject): Promise<{ rss: number; anon: number; heap: number }> => ({ ...memoryOf(s.sidecar.child.pid!), heap: await heapUsed(s.sidecar) });

    const warm = await Promise.all(subjects.map((s, i) => load(s, i, WARMUP_SECONDS)));
    for (const [i, s] of subjects.entries()) {
      s.warm = await snapshot(s);
      s.load = [warm[i]!];
    }
    const started = Date.now();
    for (const s of subjects) s.cpu = { start: cpuSeconds(s.sidecar.child.pid!), end: 0 };
    const timer = setInterval(() => {
      for (const s of subjects) s.samples.push({ t: (Date.now() - started) / 1000, ...memoryOf(s.sidecar.child.pid!) });
    }, SAMPLE_EVERY_MS);
    try {
      const soak = await Promise.all(subjects.map((s, i) => load(s, i, ctx.soakSeconds)));
      for (const [i, s] of subjects.entries()) s.load!.push(soak[i]!);
    } finally {
      clearInterval(timer);
    }
    for (const s of subjects) s.cpu!.end = cpuSeconds(s.sidecar.child.pid!);
    for (const s of subjects) s.end = await snapshot(s);

    const parts = [
      `### ${title}`,
      '',
      `${subjects[0]!.envoy !== undefined ? `Through Envoy (c), h2load --h1 ${CLIENTS} connections` : `h2load straight to the sidecar (Envoy is missing: ${ctx.tools.envoy.install})`} at ` +
        `${fmt.int(ctx.rate)} requests/s to each of two sidecars at once${ctx.workers > 1 ? ` (${ctx.workers} workers each, memory summed over their processes)` : ''}: ` +
        `${WARMUP_SECONDS} s of warm-up, then ${ctx.soakSeconds} s (BENCH_SOAK_SECONDS; the issue asks for 300). One runs with Node's defaults, the other with the container image's \`NODE_OPTIONS=${IMAGE_NODE_OPTIONS}\` (its Dockerfile sets them; the other parts of the bench run the sidecar with them too). ` +
        'RSS is VmRSS from /proc/PID/status; "anon" is its RssAnon part (JavaScript heap and native allocations; the rest is mostly the pages of the node binary, shared and ' +
        'file-backed); heap is V8\'s used heap from the sidecar\'s own /metrics, garbage not yet collected included.',
      '',
    ];
    for (const s of subjects) {
      const requests = s.load!.reduce((n, r) => n + r.requests, 0);
      const failures = s.load!.reduce((n, r) => n + r.failures, 0);
      const outcomes = await requestOutcomes(s.sidecar.adminUrl);
      const peak = Math.max(s.end!.rss, ...s.samples.map((x) => x.rss));
      const quartiles = [0.25, 0.5, 0.75].map((q) => s.samples[Math.floor(q * s.samples.length)]).filter((x) => x !== undefined);
      const grew = s.end!.anon - s.warm!.anon;
      // A step in the series is told from growth per request by when it happens: a token refresh
      // (logged by the sidecar) is a one-off, steady growth goes on through the second half.
      const refreshes = s.sidecar.logs().filter((r) => r.msg === 'token fetched')
        .map((r) => (typeof r.time === 'number' ? r.time : Date.parse(String(r.time))) - started)
        .filter((ms) => ms >= 0)
        .map((ms) => Math.round(ms / 1000));
      const secondHalf = s.samples.slice(Math.floor(s.samples.length / 2)).map((x) => x.anon);
      ctx.log(`  memory, ${s.name}: idle ${fmt.mb(s.idle.rss)} MB, warm ${fmt.mb(s.warm!.rss)} MB, end ${fmt.mb(s.end!.rss)} MB (anon ${fmt.mb(s.warm!.anon)} → ${fmt.mb(s.end!.anon)}), peak ${fmt.mb(peak)} MB`);
      parts.push(
        `**${s.name}**: ${fmt.int(outcomes.injected ?? 0)} streams answered with the token, ${fmt.int(requests)} requests sent, ${failures} not 2xx.`,
        '',
        table(['when', 'RSS (MB)', 'anon (MB)', 'V8 heap used (MB)'], [
          ['started, idle', fmt.mb(s.idle.rss), fmt.mb(s.idle.anon), ''],
          [`after ${WARMUP_SECONDS} s warm-up`, fmt.mb(s.warm!.rss), fmt.mb(s.warm!.anon), fmt.mb(s.warm!.heap)],
          ...quartiles.map((x) => [`soak, ${Math.round(x!.t)} s`, fmt.mb(x!.rss), fmt.mb(x!.anon), '']),
          [`after the ${ctx.soakSeconds} s soak`, fmt.mb(s.end!.rss), fmt.mb(s.end!.anon), fmt.mb(s.end!.heap)],
          ['peak RSS during the soak', fmt.mb(peak), '', ''],
        ]),
        '',
        `Anonymous memory from warm-up to the end: ${grew >= 0 ? '+' : '−'}${fmt.mb(Math.abs(grew))} MB over ${fmt.int(s.load![1]!.requests)} requests ` +
          `(${fmt.int(grew / s.load![1]!.requests)} bytes per request). Against the 100 MB target: peak RSS ${fmt.mb(peak)} MB (${peak <= 100 * 2 ** 20 ? 'met' : 'over'}), ` +
          `anonymous part at the end ${fmt.mb(s.end!.anon)} MB (${s.end!.anon <= 100 * 2 ** 20 ? 'met' : 'over'}). ` +
          `Anonymous memory over the second half of the soak: ${fmt.mb(Math.min(...secondHalf))}–${fmt.mb(Math.max(...secondHalf))} MB. ` +
          `Token refreshes during the soak: ${refreshes.length === 0 ? 'none' : `at ${refreshes.map((t) => `${t} s`).join(', ')}`}. ` +
          `CPU of the sidecar over the soak: ${fmt.int(((s.cpu!.end - s.cpu!.start) / s.load![1]!.requests) * 1e6)} µs per request.`,
        '',
      );
    }
    return { id: 'memory', markdown: parts.join('\n') };
  } finally {
    for (const s of subjects) {
      await s.envoy?.stop();
      await s.sidecar.stop();
    }
  }
}
