// The sidecar alone: h2load sends real ext_proc streams (one request_headers message each) to
// oauth2-extproc and to the bare grpc-js server, in alternating turns; the ratio of their
// throughputs is what the sidecar's own code costs per message.
import { join } from 'node:path';
import { fmt, skipped, table, type BenchContext, type Section } from './context.ts';
import { EXT_PROC_PATH, GRPC_HEADERS, writeRequestFrame } from './grpc-frame.ts';
import { checkReply, requestOutcomes, type BareServer, type SidecarProcess } from './processes.ts';
import { h2load, median, type LoadResult } from './tools.ts';

export const STREAM_LEVELS = [1, 16, 64];

interface Target {
  name: string;
  address: string;
}

/** Checks that a server answers the bench's message with the token mutation and gRPC OK. */
export async function assertSuccessPath(name: string, address: string, profile?: string): Promise<string> {
  const check = await checkReply(address, profile);
  if (check.code !== 0 || check.kind !== 'request_headers' || !check.authorization?.startsWith('Bearer ') || !check.removed.includes('ocp-apim-subscription-key')) {
    throw new Error(`${name} does not answer with the token mutation and gRPC OK: ${JSON.stringify({ ...check, authorization: check.authorization?.slice(0, 12) })}`);
  }
  return check.authorization;
}

export async function sidecarAlone(ctx: BenchContext, sidecar: SidecarProcess, bare: BareServer): Promise<Section> {
  const title = 'The sidecar alone: oauth2-extproc vs a bare grpc-js server';
  const bin = ctx.tools.h2load.bin;
  if (bin === undefined) return skipped('sidecar', title, `h2load is missing (${ctx.tools.h2load.install}).`);

  const authorization = await assertSuccessPath('oauth2-extproc', sidecar.grpcAddress);
  await assertSuccessPath('the bare server', bare.address);
  const frame = writeRequestFrame(ctx.dir);
  // With several workers, connections (not streams) are spread over them: one per worker and more.
  const clients = ctx.workers > 1 ? ctx.workers * 2 : 1;
  const targets: Target[] = [
    { name: ctx.workers > 1 ? `oauth2-extproc (${ctx.workers} workers)` : 'oauth2-extproc', address: sidecar.grpcAddress },
    { name: 'bare grpc-js', address: bare.address },
  ];
  const run = (t: Target, streams: number, seconds: number, warmup: number, rps?: number): Promise<LoadResult> => h2load(bin, {
    url: `http://${t.address}${EXT_PROC_PATH}`,
    clients: rps === undefined ? clients : 1,
    streams,
    seconds,
    warmupSeconds: warmup,
    rpsPerClient: rps,
    dataFile: frame.file,
    headers: GRPC_HEADERS,
    logFile: join(ctx.dir, 'h2load.log'),
  });

  for (const t of targets) await run(t, 16, 2, 0); // JIT warm-up of both servers
  const before = await requestOutcomes(sidecar.adminUrl);
  const results = new Map<number, { a: LoadResult[]; b: LoadResult[] }>();
  let sidecarRequests = 0;
  for (const streams of STREAM_LEVELS) {
    const r = { a: [] as LoadResult[], b: [] as LoadResult[] };
    results.set(streams, r);
    for (let round = 0; round < ctx.rounds; round++) {
      // Who goes first changes every round, so a drift in the machine's load favours neither.
      const [a, b] = await inTurn(round, () => run(targets[0]!, streams, ctx.seconds, 0.5), () => run(targets[1]!, streams, ctx.seconds, 0.5));
      for (const [res, t] of [[a, targets[0]!], [b, targets[1]!]] as const) {
        if (res.failures > 0) throw new Error(`${t.name}: ${res.failures} of ${res.requests} h2load requests failed`);
      }
      sidecarRequests += a.requests;
      r.a.push(a);
      r.b.push(b);
      ctx.log(`  -m ${streams} round ${round + 1}: ${targets[0]!.name} ${fmt.int(a.rps)}/s, bare ${fmt.int(b.rps)}/s, ratio ${fmt.ratio(a.rps / b.rps)}`);
    }
  }
  // Paced, one connection, one stream at a time at the rate of the Envoy comparison: the latency
  // of a server that is mostly idle between streams, as behind Envoy at a moderate rate.
  const paced = { a: [] as LoadResult[], b: [] as LoadResult[] };
  for (let round = 0; round < ctx.rounds; round++) {
    const [a, b] = await inTurn(round, () => run(targets[0]!, 1, ctx.seconds, 0.5, ctx.rate), () => run(targets[1]!, 1, ctx.seconds, 0.5, ctx.rate));
    if (a.failures + b.failures > 0) throw new Error(`paced run: ${a.failures} + ${b.failures} failed h2load requests`);
    sidecarRequests += a.requests;
    paced.a.push(a);
    paced.b.push(b);
  }
  // Every stream the sidecar saw got the token: no deny, no other outcome, none missing.
  const after = await requestOutcomes(sidecar.adminUrl);
  const delta = Object.fromEntries(Object.keys(after).map((k) => [k, (after[k] ?? 0) - (before[k] ?? 0)]));
  const others = Object.entries(delta).filter(([k, v]) => k !== 'injected' && v > 0);
  if (others.length > 0 || (delta.injected ?? 0) < sidecarRequests) {
    throw new Error(`the sidecar's outcomes during the runs are not all "injected": ${JSON.stringify(delta)} for ${sidecarRequests} measured requests`);
  }

  const rows = STREAM_LEVELS.map((streams) => {
    const r = results.get(streams)!;
    const ratios = r.a.map((a, i) => a.rps / r.b[i]!.rps);
    return [`${streams}`, fmt.int(median(r.a.map((x) => x.rps))), fmt.int(median(r.b.map((x) => x.rps))), `**${fmt.ratio(median(ratios))}**`, ratios.map(fmt.ratio).join(', ')];
  });
  const one = results.get(1)!;
  const lat = (xs: LoadResult[], k: 'mean' | 'p50' | 'p99'): number => median(xs.map((x) => x.latencyUs[k]));
  const diff = (k: 'mean' | 'p50' | 'p99'): number => median(one.a.map((a, i) => a.latencyUs[k] - one.b[i]!.latencyUs[k]));
  const pdiff = (k: 'mean' | 'p50' | 'p99'): number => median(paced.a.map((a, i) => a.latencyUs[k] - paced.b[i]!.latencyUs[k]));
  const closedLoop = `back to back (-m 1)`;
  const pacedLoop = `paced, ${fmt.int(ctx.rate)}/s`;
  const latencyRows = [
    [`${targets[0]!.name}, ${closedLoop}`, fmt.ms(lat(one.a, 'mean')), fmt.ms(lat(one.a, 'p50')), fmt.ms(lat(one.a, 'p99'))],
    [`bare grpc-js, ${closedLoop}`, fmt.ms(lat(one.b, 'mean')), fmt.ms(lat(one.b, 'p50')), fmt.ms(lat(one.b, 'p99'))],
    [`difference, ${closedLoop}`, fmt.signedMs(diff('mean')), fmt.signedMs(diff('p50')), fmt.signedMs(diff('p99'))],
    [`${targets[0]!.name}, ${pacedLoop}`, fmt.ms(lat(paced.a, 'mean')), fmt.ms(lat(paced.a, 'p50')), fmt.ms(lat(paced.a, 'p99'))],
    [`bare grpc-js, ${pacedLoop}`, fmt.ms(lat(paced.b, 'mean')), fmt.ms(lat(paced.b, 'p50')), fmt.ms(lat(paced.b, 'p99'))],
    [`difference, ${pacedLoop}`, fmt.signedMs(pdiff('mean')), fmt.signedMs(pdiff('p50')), fmt.signedMs(pdiff('p99'))],
  ];
  const worst = Math.min(...STREAM_LEVELS.map((s) => median(results.get(s)!.a.map((a, i) => a.rps / results.get(s)!.b[i]!.rps))));
  const markdown = [
    `### ${title}`,
    '',
    `h2load, ${clients} HTTP/2 connection${clients > 1 ? 's' : ''}, N concurrent streams; each stream is one ext_proc stream: a ${frame.bytes}-byte gRPC ` +
      'frame with a `request_headers` message of 10 headers (incl. `authorization` and `ocp-apim-subscription-key`), end of stream, and the ' +
      `reply (${Buffer.byteLength(authorization)}-byte \`authorization\` set, the key removed). ${ctx.rounds} rounds of ${ctx.seconds} s per target, alternating, the first to go changing every round. ` +
      'Both servers were checked with a grpc-js client to answer with gRPC status 0 and the mutation, and the sidecar counted every stream as `injected`.',
    '',
    table(['streams (-m)', `${targets[0]!.name} req/s`, 'bare grpc-js req/s', 'ratio (median)', 'ratio per round'], rows),
    '',
    ctx.workers > 1
      ? `With ${ctx.workers} workers against a one-process bare server, the ratio shows how the workers scale, not the cost per message (run with one worker for that).`
      : `Target: ratio ≥ 0.95 → worst median ratio **${fmt.ratio(worst)}** (${worst >= 0.95 ? 'met' : 'missed'}).`,
    '',
    `One stream at a time, latency per ext_proc stream in ms as h2load sees it: back to back (the next stream as soon as the last ends), and paced at ${fmt.int(ctx.rate)} streams/s on one connection (the server idle between streams); differences are medians of the per-round ones:`,
    '',
    table(['', 'mean', 'p50', 'p99'], latencyRows),
    '',
  ].join('\n');
  return { id: 'sidecar', markdown };
}

/** Runs `a` then `b` in even rounds, `b` then `a` in odd ones; resolves with both, a first. */
async function inTurn<T>(round: number, a: () => Promise<T>, b: () => Promise<T>): Promise<[T, T]> {
  if (round % 2 === 0) {
    const first = await a();
    return [first, await b()];
  }
  const first = await b();
  return [await a(), first];
}
