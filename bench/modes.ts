// The three ways Envoy takes the token (docs/modes.md), side by side in one run on one backend:
// (b) Envoy's native credential_injector with its own OAuth2 client, the baseline; (s) SDS mode,
// the same filter fed by oauth2-extproc over SDS; (c) ext_proc; (z) ext_authz. HTTP/1.1
// keep-alive clients; a fixed moderate rate for latency, then as fast as it goes; turns alternate.
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fmt, skipped, table, type BenchContext, type Section } from './context.ts';
import { startBenchEnvoy, type BenchEnvoy } from './envoy.ts';
import { cpuSeconds, startBenchSidecar, type SidecarProcess } from './processes.ts';
import { CALLER_HEADERS } from './through-envoy.ts';
import { h2load, median, type LoadResult } from './tools.ts';
import type { OAuthServer } from '../test/helpers/oauth-server.ts';

const PATH = '/orders/42?expand=lines';
const RATE_CLIENTS = 2;
const SATURATION_CONNECTIONS = 16;

type Key = 'b' | 's' | 'c' | 'z';
const KEYS: readonly Key[] = ['b', 's', 'c', 'z'];
const NAMES: Record<Key, string> = {
  b: '(b) native credential_injector, its own OAuth2 client',
  s: '(s) SDS: credential_injector fed by oauth2-extproc',
  c: '(c) ext_proc: oauth2-extproc per request',
  z: '(z) ext_authz: oauth2-extproc per request',
};

interface Turn {
  result: LoadResult;
  /** CPU µs per request: the Envoy under test, and the sidecar (s, c, z). */
  cpu: { envoy: number; sidecar: number };
}

/** What the backend saw for one request through `url`: status, authorization, key. */
async function seen(url: string): Promise<{ status: number; authorization: string; key: string }> {
  const headers = Object.fromEntries(CALLER_HEADERS.map((h) => [h.slice(0, h.indexOf(':')), h.slice(h.indexOf(':') + 1).trim()]));
  const res = await fetch(`${url}/verify`, { headers });
  await res.arrayBuffer();
  return { status: res.status, authorization: res.headers.get('x-seen-authorization') ?? '', key: res.headers.get('x-seen-subscription-key') ?? '' };
}

export async function modes(ctx: BenchContext, idp: OAuthServer, given?: SidecarProcess): Promise<Section> {
  const title = 'The three modes through Envoy: SDS (s), ext_proc (c), ext_authz (z) against the native filter (b)';
  const h2 = ctx.tools.h2load.bin;
  if (ctx.tools.envoy.bin === undefined) return skipped('modes', title, `Envoy is missing (${ctx.tools.envoy.install}).`);
  if (h2 === undefined) return skipped('modes', title, `h2load is missing (${ctx.tools.h2load.install}).`);
  const started: BenchEnvoy[] = [];
  const sidecar = given ?? await startBenchSidecar({ idp, workers: ctx.workers });
  try {
    const bin = ctx.tools.envoy.bin;
    const backend = await startBenchEnvoy({ bin, config: 'backend.yaml', clusters: {}, concurrency: 1 });
    started.push(backend);
    const upstream = backend.url.slice('http://'.length);
    const common = { bin, concurrency: ctx.envoyConcurrency };
    const all = await Promise.all([
      startBenchEnvoy({
        ...common,
        config: 'native.yaml',
        clusters: { backend: upstream, idp: new URL(idp.tokenUrl).host },
        replace: { CLIENT_ID: idp.clients.post.clientId, CLIENT_SECRET: idp.clients.post.clientSecret },
        patch: (c) => {
          c.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.credential.typed_config.token_endpoint.uri = idp.tokenUrl;
        },
      }),
      startBenchEnvoy({ ...common, config: 'sds.yaml', clusters: { backend: upstream, oauth2_extproc: sidecar.grpcAddress } }),
      startBenchEnvoy({ ...common, config: 'extproc.yaml', clusters: { backend: upstream, oauth2_extproc: sidecar.grpcAddress } }),
      startBenchEnvoy({ ...common, config: 'ext-authz.yaml', clusters: { backend: upstream, oauth2_extproc: sidecar.grpcAddress } }),
    ]);
    started.push(...all);
    const envoys = Object.fromEntries(KEYS.map((k, i) => [k, all[i]!])) as Record<Key, BenchEnvoy>;

    // Each setup injects a fresh JWT and drops the key before anything is measured.
    for (const k of KEYS) {
      const deadline = Date.now() + 15_000;
      for (;;) {
        const s = await seen(envoys[k].url);
        if (s.status === 200 && /^Bearer ey/.test(s.authorization) && s.key === '') break;
        if (Date.now() > deadline) throw new Error(`${NAMES[k]} does not inject a token and remove the key: ${JSON.stringify({ ...s, authorization: s.authorization.slice(0, 12) })}`);
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
    }

    const logFile = join(ctx.dir, 'h2load-modes.log');
    const atRate = (url: string): Promise<LoadResult> => h2load(h2, {
      url: `${url}${PATH}`, h1: true, clients: RATE_CLIENTS, streams: 1, rpsPerClient: ctx.rate / RATE_CLIENTS,
      seconds: ctx.seconds + 1, warmupSeconds: 0.5, headers: CALLER_HEADERS, logFile,
    });
    const saturate = (url: string): Promise<LoadResult> => h2load(h2, {
      url: `${url}${PATH}`, h1: true, clients: SATURATION_CONNECTIONS, streams: 1, seconds: ctx.seconds, warmupSeconds: 0.5, headers: CALLER_HEADERS, logFile,
    });
    const sidecarPid = sidecar.child.pid!;
    const turns = async (what: string, run: (url: string) => Promise<LoadResult>): Promise<Record<Key, Turn[]>> => {
      const out: Record<Key, Turn[]> = { b: [], s: [], c: [], z: [] };
      for (let round = 0; round < ctx.rounds; round++) {
        for (const k of KEYS) {
          const before = { envoy: cpuSeconds(envoys[k].pid), sidecar: cpuSeconds(sidecarPid) };
          const t0 = performance.now();
          const result = await run(envoys[k].url);
          const wall = (performance.now() - t0) / 1000;
          if (result.failures > 0) throw new Error(`${NAMES[k]}, ${what}: ${result.failures} of ${result.requests} requests were not 2xx`);
          const perReq = (s: number): number => (s * 1e6) / (result.rps * wall);
          out[k].push({ result, cpu: { envoy: perReq(cpuSeconds(envoys[k].pid) - before.envoy), sidecar: perReq(cpuSeconds(sidecarPid) - before.sidecar) } });
        }
        ctx.log(`  modes, ${what} round ${round + 1}: ` + KEYS.map((k) => `${k} ${fmt.int(out[k][round]!.result.rps)}/s p50 ${fmt.ms(out[k][round]!.result.latencyUs.p50)}`).join(', '));
      }
      return out;
    };
    const med = (xs: Turn[], pick: (t: Turn) => number): number => median(xs.map(pick));
    const diff = (t: Record<Key, Turn[]>, k: Key, base: Key, pick: (t: Turn) => number): number => median(t[k].map((x, i) => pick(x) - pick(t[base][i]!)));
    const ratio = (t: Record<Key, Turn[]>, k: Key, base: Key): number => median(t[k].map((x, i) => x.result.rps / t[base][i]!.result.rps));
    const p50 = (t: Turn): number => t.result.latencyUs.p50;
    const p99 = (t: Turn): number => t.result.latencyUs.p99;

    for (const k of KEYS) await saturate(envoys[k].url); // warm-up
    const rate = await turns(`${ctx.rate}/s`, atRate);
    const sat = await turns('saturation', saturate);
    const sdsP50 = diff(rate, 's', 'b', p50);
    const sdsSat = ratio(sat, 's', 'b');

    const parts = [
      `### ${title}`,
      '',
      `Envoy ${ctx.tools.envoy.version} with ${ctx.envoyConcurrency} worker threads per setup, the backend Envoy and one oauth2-extproc (server.workers ${ctx.workers}) shared by (s), (c) and (z), ` +
        'all on 127.0.0.1. bench/envoy/sds.yaml has the filters of envoy/envoy-sds.yaml (header_mutation removing the key header and `?subscription-key=`, credential_injector with the generic credential over SDS); ' +
        '(b) removes the key header on its route. Before measuring, one request through each setup showed the backend a fresh JWT and no key. ' +
        `${ctx.rounds} rounds, turns alternating b, s, c, z; medians over rounds, differences and ratios are medians of the per-round ones; CPU in µs per request (from /proc/PID/stat over the turn).`,
      '',
      `At a fixed ${fmt.int(ctx.rate)} requests/s (h2load --h1, ${RATE_CLIENTS} connections):`,
      '',
      table(['setup', 'req/s', 'p50 ms', 'p99 ms', 'p50 − (b)', 'p99 − (b)', 'Envoy CPU', 'sidecar CPU'], KEYS.map((k) => [
        NAMES[k], fmt.int(med(rate[k], (t) => t.result.rps)), fmt.ms(med(rate[k], p50)), fmt.ms(med(rate[k], p99)),
        k === 'b' ? '' : fmt.signedMs(diff(rate, k, 'b', p50)), k === 'b' ? '' : fmt.signedMs(diff(rate, k, 'b', p99)),
        med(rate[k], (t) => t.cpu.envoy).toFixed(0), k === 'b' ? '' : med(rate[k], (t) => t.cpu.sidecar).toFixed(0),
      ])),
      '',
      `As fast as it goes (h2load --h1 -c ${SATURATION_CONNECTIONS}, ${ctx.seconds} s per turn), everything sharing the same CPUs:`,
      '',
      table(['setup', 'req/s', 'vs (b)', 'p50 ms', 'p99 ms', 'Envoy CPU', 'sidecar CPU'], KEYS.map((k) => [
        NAMES[k], fmt.int(med(sat[k], (t) => t.result.rps)), fmt.ratio(ratio(sat, k, 'b')), fmt.ms(med(sat[k], p50)), fmt.ms(med(sat[k], p99)),
        med(sat[k], (t) => t.cpu.envoy).toFixed(0), k === 'b' ? '' : med(sat[k], (t) => t.cpu.sidecar).toFixed(0),
      ])),
      '',
      `SDS against the native filter: saturation **${fmt.ratio(sdsSat)}×** (target ≥ 0.95×: ${sdsSat >= 0.95 ? 'met' : 'missed'}), ` +
        `added p50 **${fmt.signedMs(sdsP50)} ms** (target ≤ 0.02 ms: ${sdsP50 <= 20 ? 'met' : 'missed'}). ` +
        `ext_authz against ext_proc: saturation ${fmt.ratio(ratio(sat, 'z', 'c'))}×, p50 ${fmt.signedMs(diff(rate, 'z', 'c', p50))} ms at the fixed rate, ` +
        `Envoy CPU per request ${med(rate.z, (t) => t.cpu.envoy).toFixed(0)} µs against ${med(rate.c, (t) => t.cpu.envoy).toFixed(0)} µs.`,
      '',
    ];
    ctx.log(`  modes: SDS ${fmt.ratio(sdsSat)}× of native, p50 ${fmt.signedMs(sdsP50)} ms; ext_authz ${fmt.ratio(ratio(sat, 'z', 'c'))}× of ext_proc`);
    return { id: 'modes', markdown: parts.join('\n') };
  } finally {
    await Promise.all(started.map((e) => e.stop()));
    if (given === undefined) await sidecar.stop();
  }
}
