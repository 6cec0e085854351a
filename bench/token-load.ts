// Token endpoint load: how many token requests a burst of streams causes on a cold start and a
// refresh under load, and whether any request waits for the token endpoint while it is slow.
// Two profiles, a token endpoint that answers every fetch of this part 1.5–2 s late.
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fmt, skipped, table, type BenchContext, type Section } from './context.ts';
import { EXT_PROC_PATH, GRPC_HEADERS, writeRequestFrame } from './grpc-frame.ts';
import { requestOutcomes, startBenchSidecar } from './processes.ts';
import { h2load, percentile, summarize } from './tools.ts';
import { ExtProcClient, requestHeaders, setHeaders, TYPICAL_HEADERS } from '../test/helpers/extproc-client.ts';
import { startOAuthServer } from '../test/helpers/oauth-server.ts';

const STREAMS = 200; // per profile and burst
const COLD_DELAY_MS = 1500;
const REFRESH_DELAY_MS = 2000;
const TTL_SECONDS = 20;
// Refresh at a quarter of the lifetime (5 s after the first token), no jitter, so the refresh
// falls inside the load run; the token stays usable until 2 s before expiry.
const REFRESH = { share: 0.25, jitter: 0, marginSeconds: 2 };
const PROFILES = { default: 'api://orders/.default', reports: 'orders.read' };
const RATE_PER_PROFILE = 500;
const LOAD_SECONDS = 9;

interface Burst {
  injected: number;
  denied: Record<string, number>;
  failed: number;
  maxMs: number;
  p99Ms: number;
}

/** `STREAMS` concurrent ext_proc streams per profile, all opened at once on one connection. */
async function burst(address: string): Promise<Burst> {
  const client = new ExtProcClient(address);
  const message = requestHeaders(TYPICAL_HEADERS);
  const out: Burst = { injected: 0, denied: {}, failed: 0, maxMs: 0, p99Ms: 0 };
  const latencies: number[] = [];
  await Promise.all(Object.keys(PROFILES).flatMap((profile) => Array.from({ length: STREAMS }, async () => {
    const t0 = performance.now();
    try {
      const { reply } = await client.exchange(message, { profile: profile === 'default' ? undefined : profile });
      latencies.push(performance.now() - t0);
      if (reply.response === 'request_headers' && setHeaders(reply).authorization?.startsWith('Bearer ')) out.injected++;
      else {
        const code = String(reply.immediate_response?.status?.code ?? reply.response);
        out.denied[code] = (out.denied[code] ?? 0) + 1;
      }
    } catch {
      out.failed++;
    }
  })));
  client.close();
  latencies.sort((a, b) => a - b);
  out.maxMs = latencies.at(-1) ?? Number.NaN;
  out.p99Ms = percentile(latencies, 99);
  return out;
}

export async function tokenLoad(ctx: BenchContext): Promise<Section> {
  const title = 'Token endpoint load: cold start and refresh under load';
  const idp = await startOAuthServer({ ttlSeconds: TTL_SECONDS });
  const requests: Array<{ at: number; profile: string }> = [];
  const scopeToProfile = new Map(Object.entries(PROFILES).map(([p, s]) => [s, p]));
  // Timestamps of token requests as they arrive (the helper records the requests only).
  const poll = setInterval(() => {
    while (requests.length < idp.tokenRequests.length) {
      const r = idp.tokenRequests[requests.length]!;
      requests.push({ at: Date.now(), profile: scopeToProfile.get(r.form.get('scope') ?? '') ?? '?' });
    }
  }, 2);
  const perProfile = (from = 0): string => Object.keys(PROFILES).map((p) => `${p}: ${requests.slice(from).filter((r) => r.profile === p).length}`).join(', ');
  let sidecar: Awaited<ReturnType<typeof startBenchSidecar>> | undefined;
  try {
    idp.override({ delayMs: COLD_DELAY_MS }, { delayMs: COLD_DELAY_MS });
    sidecar = await startBenchSidecar({
      idp, workers: ctx.workers, waitReady: false,
      profileExtra: { refresh: REFRESH, scope: PROFILES.default },
      profiles: { reports: { scope: PROFILES.reports } },
    });
    // Cold start: the token endpoint has not answered yet.
    const cold = await burst(sidecar.grpcAddress);
    const coldCount = perProfile();
    await sidecar.waitForLog((r) => typeof r.msg === 'string' && r.msg.startsWith('ready'), 10_000);
    const afterCold = requests.length;
    const warm = await burst(sidecar.grpcAddress);
    const warmCount = perProfile();
    const afterWarm = requests.length;
    ctx.log(`  cold start: ${cold.injected} injected, denied ${JSON.stringify(cold.denied)}, slowest ${cold.maxMs.toFixed(1)} ms; token requests ${perProfile()}`);

    let refreshRows: string[][] = [];
    let refreshText = `Refresh under load: not measured (h2load is missing: ${ctx.tools.h2load.install}).`;
    const h2 = ctx.tools.h2load.bin;
    if (h2 !== undefined) {
      const frame = writeRequestFrame(ctx.dir);
      idp.override({ delayMs: REFRESH_DELAY_MS }, { delayMs: REFRESH_DELAY_MS });
      const before = await requestOutcomes(sidecar.adminUrl);
      const rows: Array<{ startUs: number; status: number; latencyUs: number }> = [];
      const runs = Object.keys(PROFILES).map((profile, i) => h2load(h2, {
        url: `http://${sidecar!.grpcAddress}${EXT_PROC_PATH}`,
        clients: 1, streams: 4, rpsPerClient: RATE_PER_PROFILE, seconds: LOAD_SECONDS,
        dataFile: frame.file,
        headers: profile === 'default' ? GRPC_HEADERS : [...GRPC_HEADERS, `x-oauth2-profile: ${profile}`],
        logFile: join(ctx.dir, `h2load-refresh-${i}.log`),
        onLog: (r) => rows.push(...r),
      }));
      const results = await Promise.all(runs);
      const after = await requestOutcomes(sidecar.adminUrl);
      const refreshes = requests.slice(afterWarm);
      if (refreshes.length === 0) throw new Error('no refresh happened during the load run');
      // A request "during the refresh" started while some token request was outstanding.
      const windows = refreshes.map((r) => [r.at * 1000, (r.at + REFRESH_DELAY_MS) * 1000] as const);
      const inside = (us: number): boolean => windows.some(([a, b]) => us >= a && us <= b);
      const during = Float64Array.from(rows.filter((r) => inside(r.startUs)).map((r) => r.latencyUs)).sort();
      const outside = Float64Array.from(rows.filter((r) => !inside(r.startUs)).map((r) => r.latencyUs)).sort();
      const d = summarize(during);
      const o = summarize(outside);
      const notInjected = Object.entries(after).filter(([k]) => k !== 'injected').reduce((s, [k, v]) => s + v - (before[k] ?? 0), 0);
      const failures = results.reduce((s, r) => s + r.failures, 0);
      refreshRows = [
        ['streams started while a token request was outstanding', fmt.int(during.length), fmt.ms(d.p50), fmt.ms(d.p99), fmt.ms(d.max)],
        ['all other streams of the run', fmt.int(outside.length), fmt.ms(o.p50), fmt.ms(o.p99), fmt.ms(o.max)],
      ];
      const fetched = sidecar.logs().filter((r) => r.msg === 'token fetched').slice(-refreshes.length);
      refreshText = `Refresh under load: ${Object.keys(PROFILES).length} h2load clients, one per profile, ${RATE_PER_PROFILE} streams/s each for ${LOAD_SECONDS} s ` +
        `(${fmt.int(rows.length)} streams). The token endpoint answered each refresh ${REFRESH_DELAY_MS} ms late ` +
        `(the sidecar logged fetches of ${fetched.map((r) => `${r.durationMs} ms`).join(' and ')}). Token requests during the run: ${perProfile(afterWarm)}. ` +
        `Streams not answered with the token: ${notInjected}; failed h2load requests: ${failures}. Latency per stream in ms:`;
      ctx.log(`  refresh: ${perProfile(afterWarm)}; during p99 ${fmt.ms(d.p99)} ms vs outside ${fmt.ms(o.p99)} ms; not injected ${notInjected}`);
    }

    const markdown = [
      `### ${title}`,
      '',
      `Two profiles (\`default\` and \`reports\`, different scopes), token lifetime ${TTL_SECONDS} s, refresh at ${REFRESH.share * 100} % of it without jitter` +
        `${ctx.workers > 1 ? `, ${ctx.workers} workers` : ''}.`,
      '',
      table(['', 'streams', 'answered with a token', 'answered at once without one', 'failed', 'slowest (ms, client side)', 'token requests so far'], [
        [`cold start: burst while the token endpoint takes ${COLD_DELAY_MS} ms`, fmt.int(STREAMS * 2), fmt.int(cold.injected), Object.entries(cold.denied).map(([c, n]) => `${n} × ${c}`).join(', ') || '0', String(cold.failed), cold.maxMs.toFixed(1), coldCount],
        ['after ready: the same burst', fmt.int(STREAMS * 2), fmt.int(warm.injected), Object.entries(warm.denied).map(([c, n]) => `${n} × ${c}`).join(', ') || '0', String(warm.failed), warm.maxMs.toFixed(1), warmCount],
      ]),
      '',
      `Token requests after both bursts: ${afterWarm} (${afterCold === afterWarm ? 'the bursts added none' : `${afterWarm - afterCold} added by the second burst`}). ` +
        'Streams that arrive before the first token are answered at once with the configured deny (503), never held until the token endpoint answers.',
      '',
      refreshText,
      '',
      ...(refreshRows.length > 0 ? [table(['', 'streams', 'p50', 'p99', 'max'], refreshRows), ''] : []),
    ].join('\n');
    return { id: 'tokens', markdown };
  } catch (err) {
    return skipped('tokens', title, `failed: ${(err as Error).message}`);
  } finally {
    clearInterval(poll);
    await sidecar?.stop();
    await idp.close();
  }
}
