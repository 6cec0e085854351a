// Through the real Envoy, in one run on one backend: (a) no credential filter, (b) Envoy's native
// credential_injector (OAuth2 client credentials) plus removal of the key, (c) Envoy +
// oauth2-extproc, and, to tell the cost of the ext_proc hop from the cost of the sidecar's code,
// (d) the same ext_proc config pointed at the bare grpc-js server. HTTP/1.1 keep-alive clients;
// a fixed moderate rate for latency, then as fast as it goes; turns alternate a, b, c, d, a, b…
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fmt, skipped, table, type BenchContext, type Section } from './context.ts';
import { extprocDrift, startBenchEnvoy, type BenchEnvoy } from './envoy.ts';
import { cpuSeconds, type BareServer, type SidecarProcess } from './processes.ts';
import { h2load, median, wrk, type LoadResult } from './tools.ts';
import type { OAuthServer } from '../test/helpers/oauth-server.ts';

const PATH = '/orders/42?expand=lines';
/** What a caller of the APIM-style API sends: its key, and an Authorization that must not pass. */
export const CALLER_HEADERS = [
  'ocp-apim-subscription-key: 0123456789abcdef0123456789abcdef',
  'authorization: Bearer forged-by-the-caller',
  'accept: application/json',
];
// Two connections at rate/2 each: h2load fires the requests of all its clients on one timer, so
// ten connections at rate/10 would arrive in bursts of ten and measure queueing behind the burst
// (seen here: p50 0.85 ms instead of 0.15 ms for Envoy alone); HTTP/2 --rps bursts likewise.
const RATE_CLIENTS = 2;
const SATURATION_CONNECTIONS = 16;

type Key = 'a' | 'b' | 'c' | 'd';
const KEYS: readonly Key[] = ['a', 'b', 'c', 'd'];
const NAMES: Record<Key, string> = {
  a: '(a) Envoy, no credential filter',
  b: '(b) Envoy + native credential_injector',
  c: '(c) Envoy + oauth2-extproc',
  d: '(d) Envoy + bare grpc-js ext_proc (diagnostic)',
};

export interface Setups {
  backend: BenchEnvoy;
  envoys: Record<Key, BenchEnvoy>;
  /** The ext_proc server behind (c) and (d). */
  servers: { c: number; d: number };
  stop(): Promise<void>;
}

export async function startSetups(ctx: BenchContext, idp: OAuthServer, sidecar: SidecarProcess, bare: BareServer): Promise<Setups> {
  const bin = ctx.tools.envoy.bin!;
  const started: BenchEnvoy[] = [];
  const stop = async (): Promise<void> => {
    await Promise.all(started.map((e) => e.stop()));
  };
  try {
    const backend = await startBenchEnvoy({ bin, config: 'backend.yaml', clusters: {}, concurrency: 1 });
    started.push(backend);
    const backendAddress = backend.url.slice('http://'.length);
    const common = { bin, concurrency: ctx.envoyConcurrency };
    const all = await Promise.all([
      startBenchEnvoy({ ...common, config: 'plain.yaml', clusters: { backend: backendAddress } }),
      startBenchEnvoy({
        ...common,
        config: 'native.yaml',
        clusters: { backend: backendAddress, idp: new URL(idp.tokenUrl).host },
        replace: { CLIENT_ID: idp.clients.post.clientId, CLIENT_SECRET: idp.clients.post.clientSecret },
        patch: (c) => {
          const filter = c.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0];
          filter.typed_config.credential.typed_config.token_endpoint.uri = idp.tokenUrl;
        },
      }),
      startBenchEnvoy({ ...common, config: 'extproc.yaml', clusters: { backend: backendAddress, oauth2_extproc: sidecar.grpcAddress } }),
      startBenchEnvoy({ ...common, config: 'extproc.yaml', clusters: { backend: backendAddress, oauth2_extproc: bare.address } }),
    ]);
    started.push(...all);
    const [a, b, c, d] = all as [BenchEnvoy, BenchEnvoy, BenchEnvoy, BenchEnvoy];
    return { backend, envoys: { a, b, c, d }, servers: { c: sidecar.child.pid!, d: bare.pid }, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** One request to /verify: what the backend received (the backend echoes it in headers). */
async function seenByBackend(url: string): Promise<{ status: number; authorization: string; key: string }> {
  const headers: Record<string, string> = {};
  for (const h of CALLER_HEADERS) {
    const i = h.indexOf(':');
    headers[h.slice(0, i)] = h.slice(i + 1).trim();
  }
  const res = await fetch(`${url}/verify`, { headers });
  await res.arrayBuffer();
  return { status: res.status, authorization: res.headers.get('x-seen-authorization') ?? '', key: res.headers.get('x-seen-subscription-key') ?? '' };
}

/** Waits until each setup does its job: (a) passes both through, the others swap them. */
export async function verifySetups(s: Setups): Promise<void> {
  const plain = await seenByBackend(s.envoys.a.url);
  if (plain.status !== 200 || plain.authorization !== 'Bearer forged-by-the-caller' || plain.key === '') {
    throw new Error(`(a) does not pass the request through as sent: ${JSON.stringify(plain)}`);
  }
  for (const k of ['b', 'c', 'd'] as const) {
    const deadline = Date.now() + 15_000;
    // The bare server's "token" is a constant string of x's; the others must carry a real JWT.
    const token = k === 'd' ? /^Bearer x+$/ : /^Bearer ey/;
    for (;;) {
      const seen = await seenByBackend(s.envoys[k].url);
      // Envoy's native filter answers 401 until its first token arrives.
      if (seen.status === 200 && token.test(seen.authorization) && seen.key === '') break;
      if (Date.now() > deadline) throw new Error(`${NAMES[k]} does not inject a token and remove the key: ${JSON.stringify({ ...seen, authorization: seen.authorization.slice(0, 12) })}`);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
}

interface Turn {
  result: LoadResult;
  /** CPU µs per request of the Envoy under test, of its ext_proc server (c, d), of the backend. */
  cpu: { envoy: number; server: number; backend: number };
}
type Turns = Record<Key, Turn[]>;

export async function throughEnvoy(ctx: BenchContext, setups: Setups): Promise<Section> {
  const title = 'Through Envoy: no filter (a), native credential_injector (b), oauth2-extproc (c)';
  const h2 = ctx.tools.h2load.bin;
  if (h2 === undefined && ctx.tools.wrk.bin === undefined) {
    return skipped('envoy', title, `no load generator: h2load (${ctx.tools.h2load.install}) or wrk (${ctx.tools.wrk.install}).`);
  }
  const drift = extprocDrift();
  const logFile = join(ctx.dir, 'h2load-envoy.log');
  const atRate = (url: string): Promise<LoadResult> => h2load(h2!, {
    url: `${url}${PATH}`, h1: true, clients: RATE_CLIENTS, streams: 1, rpsPerClient: ctx.rate / RATE_CLIENTS,
    seconds: ctx.seconds + 1, warmupSeconds: 0.5, headers: CALLER_HEADERS, logFile,
  });
  const saturate = (url: string): Promise<LoadResult> => ctx.tools.wrk.bin !== undefined
    ? wrk(ctx.tools.wrk.bin, { url: `${url}${PATH}`, connections: SATURATION_CONNECTIONS, seconds: ctx.seconds, headers: CALLER_HEADERS })
    : h2load(h2!, { url: `${url}${PATH}`, h1: true, clients: SATURATION_CONNECTIONS, streams: 1, seconds: ctx.seconds, warmupSeconds: 0.5, headers: CALLER_HEADERS, logFile });
  const saturationTool = ctx.tools.wrk.bin !== undefined ? `wrk -t 1 -c ${SATURATION_CONNECTIONS}` : `h2load --h1 -c ${SATURATION_CONNECTIONS} (wrk is missing: ${ctx.tools.wrk.install})`;

  const turns = async (what: string, run: (url: string) => Promise<LoadResult>): Promise<Turns> => {
    const out: Turns = { a: [], b: [], c: [], d: [] };
    for (let round = 0; round < ctx.rounds; round++) {
      for (const k of KEYS) {
        const server = k === 'c' || k === 'd' ? setups.servers[k] : undefined;
        const before = { envoy: cpuSeconds(setups.envoys[k].pid), server: server === undefined ? 0 : cpuSeconds(server), backend: cpuSeconds(setups.backend.pid) };
        const t0 = performance.now();
        const result = await run(setups.envoys[k].url);
        const wallSeconds = (performance.now() - t0) / 1000;
        const after = { envoy: cpuSeconds(setups.envoys[k].pid), server: server === undefined ? 0 : cpuSeconds(server), backend: cpuSeconds(setups.backend.pid) };
        if (result.failures > 0) throw new Error(`${NAMES[k]}, ${what}: ${result.failures} of ${result.requests} requests were not 2xx`);
        // CPU over the whole turn, warm-up included, per request sent in it (rate × wall time).
        const perReq = (s: number): number => (s * 1e6) / (result.rps * wallSeconds);
        out[k].push({ result, cpu: { envoy: perReq(after.envoy - before.envoy), server: perReq(after.server - before.server), backend: perReq(after.backend - before.backend) } });
      }
      ctx.log(`  ${what} round ${round + 1}: ` + KEYS.map((k) => `${k} ${fmt.int(out[k][round]!.result.rps)}/s p50 ${fmt.ms(out[k][round]!.result.latencyUs.p50)} p99 ${fmt.ms(out[k][round]!.result.latencyUs.p99)}`).join(', '));
    }
    return out;
  };
  const med = (xs: Turn[], pick: (t: Turn) => number): number => median(xs.map(pick));
  const diff = (t: Turns, k: Key, base: Key, pick: (t: Turn) => number): number => median(t[k].map((x, i) => pick(x) - pick(t[base][i]!)));
  const ratio = (t: Turns, k: Key, base: Key): number => median(t[k].map((x, i) => x.result.rps / t[base][i]!.result.rps));
  const p50 = (t: Turn): number => t.result.latencyUs.p50;
  const p99 = (t: Turn): number => t.result.latencyUs.p99;

  // Warm-up: connections, Envoy's pools, the servers' JIT.
  for (const k of KEYS) await saturate(setups.envoys[k].url);
  const streamsBefore = await setups.envoys.c.stats('ext_proc\\.');

  const parts: string[] = [`### ${title}`, ''];
  parts.push(
    `Envoy ${ctx.tools.envoy.version} with ${ctx.envoyConcurrency} worker thread${ctx.envoyConcurrency > 1 ? 's' : ''} for each setup, one shared backend (a separate Envoy answering 200 itself, ` +
      '1 worker, HTTP/1.1), the token endpoint and the ext_proc servers on the same 127.0.0.1 (TCP). (c) and (d) use the ext_proc filter and cluster settings of the shipped envoy/envoy.yaml' +
      `${drift.length > 0 ? ` (**warning:** bench/envoy/extproc.yaml differs from it in ${drift.join(', ')})` : ''}. Every request is ` +
      `\`GET ${PATH}\` with a subscription key and a forged \`authorization\`; before measuring, one request through each setup showed the backend ` +
      'receiving the caller\'s headers in (a), and a fresh JWT and no key in (b) and (c). Every measured request answered 2xx. ' +
      `${ctx.rounds} rounds, turns alternating a, b, c, d; figures are medians over rounds, differences and ratios are medians of the per-round ones.`,
    '',
  );

  const verdict: string[] = [];
  if (h2 !== undefined) {
    const rate = await turns(`${ctx.rate}/s`, atRate);
    const dp50 = diff(rate, 'c', 'b', p50);
    const dp99 = diff(rate, 'c', 'b', p99);
    parts.push(
      `At a fixed ${fmt.int(ctx.rate)} requests/s (h2load --h1, ${RATE_CLIENTS} connections at ${ctx.rate / RATE_CLIENTS}/s each, ${ctx.seconds + 1} s per turn); latency in ms from request to last byte; ` +
        'CPU in µs per request of the Envoy under test and of its ext_proc server (from /proc/PID/stat over the turn):',
      '',
      table(['setup', 'req/s', 'p50', 'p99', 'p50 − (b)', 'p99 − (b)', 'Envoy CPU', 'ext_proc CPU'], KEYS.map((k) => [
        NAMES[k], fmt.int(med(rate[k], (t) => t.result.rps)), fmt.ms(med(rate[k], p50)), fmt.ms(med(rate[k], p99)),
        k === 'b' ? '' : fmt.signedMs(diff(rate, k, 'b', p50)), k === 'b' ? '' : fmt.signedMs(diff(rate, k, 'b', p99)),
        med(rate[k], (t) => t.cpu.envoy).toFixed(0), k === 'c' || k === 'd' ? med(rate[k], (t) => t.cpu.server).toFixed(0) : '',
      ])),
      '',
      `Added by (c) over (b): p50 **${fmt.signedMs(dp50)} ms** (target ≤ 0.25 ms: ${dp50 <= 250 ? 'met' : `missed by ${fmt.ms(dp50 - 250)} ms`}), ` +
        `p99 **${fmt.signedMs(dp99)} ms** (target ≤ 1 ms: ${dp99 <= 1000 ? 'met' : `missed by ${fmt.ms(dp99 - 1000)} ms`}). ` +
        `(c) over (d), i.e. the sidecar's code against a server with none: p50 ${fmt.signedMs(diff(rate, 'c', 'd', p50))} ms, p99 ${fmt.signedMs(diff(rate, 'c', 'd', p99))} ms.`,
      '',
    );
    verdict.push(`p50 ${fmt.signedMs(dp50)} ms`, `p99 ${fmt.signedMs(dp99)} ms`);
  } else {
    parts.push(`The fixed-rate latency needs h2load (${ctx.tools.h2load.install}); not measured.`, '');
  }

  const sat = await turns('saturation', saturate);
  const satRatio = ratio(sat, 'c', 'b');
  parts.push(
    `As fast as it goes (${saturationTool}, ${ctx.seconds} s per turn), everything sharing the same CPUs; CPU in µs per request ` +
      'of the Envoy under test, of its ext_proc server, and of the backend Envoy:',
    '',
    table(['setup', 'req/s', 'p50', 'p99', 'vs (b)', 'vs (a)', 'Envoy CPU', 'ext_proc CPU', 'backend CPU'], KEYS.map((k) => [
      NAMES[k], fmt.int(med(sat[k], (t) => t.result.rps)), fmt.ms(med(sat[k], p50)), fmt.ms(med(sat[k], p99)),
      fmt.ratio(ratio(sat, k, 'b')), fmt.ratio(ratio(sat, k, 'a')),
      med(sat[k], (t) => t.cpu.envoy).toFixed(0), k === 'c' || k === 'd' ? med(sat[k], (t) => t.cpu.server).toFixed(0) : '', med(sat[k], (t) => t.cpu.backend).toFixed(0),
    ])),
    '',
    `Saturation throughput of (c) over (b): **${fmt.ratio(satRatio)}×** (target ≥ 0.5×: ${satRatio >= 0.5 ? 'met' : `missed by ${fmt.ratio(0.5 - satRatio)}`}); ` +
      `of (c) over (d): ${fmt.ratio(ratio(sat, 'c', 'd'))}×.`,
    '',
  );
  verdict.push(`saturation ${fmt.ratio(satRatio)}×, c/d ${fmt.ratio(ratio(sat, 'c', 'd'))}×`);

  const streamsAfter = await setups.envoys.c.stats('ext_proc\\.');
  const pick = (s: Record<string, number>, suffix: string): number => Object.entries(s).filter(([k]) => k.endsWith(suffix)).reduce((sum, [, v]) => sum + v, 0);
  const failed = pick(streamsAfter, 'streams_failed') - pick(streamsBefore, 'streams_failed');
  const timeouts = pick(streamsAfter, 'message_timeouts') - pick(streamsBefore, 'message_timeouts');
  const started = pick(streamsAfter, 'streams_started') - pick(streamsBefore, 'streams_started');
  parts.push(`Envoy's ext_proc stats for (c) over the measured turns: ${fmt.int(started)} streams started, ${failed} failed, ${timeouts} message timeouts.`, '');
  ctx.log(`  through Envoy: ${verdict.join(', ')}`);
  return { id: 'envoy', markdown: parts.join('\n') };
}
