#!/usr/bin/env node
// `npm run bench`: every comparison of issue 4 in one run, side by side, in alternating turns,
// reported as medians and ratios; the tables go to docs/benchmarks.md between markers.
//
//   npm run bench [-- --only sidecar,workers,envoy,modes,tokens,memory,profile] [--workers N] [--no-write] [--install]
//
// It finds h2load, wrk and Envoy, says which is missing and how to get it, and skips what needs
// it; --install installs what is missing first (apt-get as root, pip for Envoy).
// Knobs (environment): BENCH_SECONDS (3: measured seconds per turn), BENCH_ROUNDS (3),
// BENCH_RATE (1000: the fixed rate through Envoy, requests/s), BENCH_SOAK_SECONDS (60; 300 for
// the issue's five minutes), BENCH_WORKERS (1: the sidecar's server.workers),
// BENCH_ENVOY_CONCURRENCY (2: Envoy worker threads), BENCH_PROFILE_SECONDS (5).
// Loopback only; every process it starts is stopped at the end, and every load run is bounded.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, release, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { skipped, type BenchContext, type Section } from './context.ts';
import { memory } from './memory.ts';
import { modes } from './modes.ts';
import { workerScaling } from './workers.ts';
import { buildSidecar, startBareProcess, startBenchSidecar, type BareServer, type SidecarProcess } from './processes.ts';
import { profileSidecar } from './profile.ts';
import { assertSuccessPath, sidecarAlone } from './sidecar-alone.ts';
import { startSetups, throughEnvoy, verifySetups, type Setups } from './through-envoy.ts';
import { tokenLoad } from './token-load.ts';
import { findTools } from './tools.ts';
import { startOAuthServer } from '../test/helpers/oauth-server.ts';

const DOC = fileURLToPath(new URL('../docs/benchmarks.md', import.meta.url));
const PARTS = ['sidecar', 'workers', 'envoy', 'modes', 'tokens', 'memory', 'profile'] as const;
type Part = (typeof PARTS)[number];

function envNumber(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`${name} must be a positive number, got "${raw}"`);
  return n;
}

function packageVersion(name: string): string {
  try {
    const file = fileURLToPath(new URL(`../node_modules/${name}/package.json`, import.meta.url));
    return (JSON.parse(readFileSync(file, 'utf8')) as { version: string }).version;
  } catch {
    return 'unknown';
  }
}

/** Replaces the text between `<!-- bench:ID:begin -->` and `<!-- bench:ID:end -->`, or appends it. */
export function replaceSection(doc: string, id: string, body: string): string {
  const begin = `<!-- bench:${id}:begin -->`;
  const end = `<!-- bench:${id}:end -->`;
  const block = `${begin}\n${body.trim()}\n${end}`;
  const i = doc.indexOf(begin);
  const j = doc.indexOf(end);
  if (i >= 0 && j > i) return `${doc.slice(0, i)}${block}${doc.slice(j + end.length)}`;
  return `${doc.trimEnd()}\n\n${block}\n`;
}

/**
 * `--install`: what is missing, installed with the ordinary clients: apt-get for h2load and wrk
 * (as root on Debian/Ubuntu), scripts/ensure-envoy.ts (pip) for Envoy.
 */
function install(): void {
  const tools = findTools();
  const packages = [tools.h2load.bin === undefined ? 'nghttp2-client' : '', tools.wrk.bin === undefined ? 'wrk' : ''].filter((p) => p !== '');
  if (packages.length > 0) {
    if (process.getuid?.() !== 0 || spawnSync('apt-get', ['--version'], { stdio: 'ignore' }).error !== undefined) {
      console.log(`--install: cannot install ${packages.join(', ')} here (needs apt-get as root); install them by hand.`);
    } else {
      console.log(`--install: apt-get install ${packages.join(' ')}`);
      spawnSync('apt-get', ['update', '-qq'], { stdio: 'inherit' });
      spawnSync('apt-get', ['install', '-y', '-qq', ...packages], { stdio: 'inherit', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
    }
  }
  if (tools.envoy.bin === undefined) spawnSync(process.execPath, [fileURLToPath(new URL('../scripts/ensure-envoy.ts', import.meta.url)), '--optional'], { stdio: 'inherit' });
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: { only: { type: 'string' }, workers: { type: 'string' }, 'no-write': { type: 'boolean' }, install: { type: 'boolean' } },
  });
  if (values.install) install();
  const only = values.only === undefined ? [...PARTS] : values.only.split(',').map((s) => s.trim());
  for (const p of only) if (!(PARTS as readonly string[]).includes(p)) throw new Error(`--only: unknown part "${p}" (parts: ${PARTS.join(', ')})`);
  const wanted = (p: Part): boolean => only.includes(p);

  buildSidecar();
  const tools = findTools();
  const dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-bench-'));
  const ctx: BenchContext = {
    tools,
    seconds: envNumber('BENCH_SECONDS', 3),
    rounds: Math.round(envNumber('BENCH_ROUNDS', 3)),
    rate: envNumber('BENCH_RATE', 1000),
    soakSeconds: envNumber('BENCH_SOAK_SECONDS', 60),
    workers: Math.round(Number(values.workers ?? envNumber('BENCH_WORKERS', 1))),
    envoyConcurrency: Math.round(envNumber('BENCH_ENVOY_CONCURRENCY', 2)),
    profileSeconds: envNumber('BENCH_PROFILE_SECONDS', 5),
    dir,
    log: (line) => console.log(line),
  };

  for (const t of Object.values(tools)) {
    console.log(t.bin === undefined ? `${t.name}: MISSING — the parts that need it are skipped. Install: ${t.install}` : `${t.name}: ${t.bin} (${t.version})`);
  }
  const started = Date.now();
  const load = loadavg()[0]!;
  const sections: Section[] = [];
  const idp = await startOAuthServer();
  let sidecar: SidecarProcess | undefined;
  let bare: BareServer | undefined;
  let setups: Setups | undefined;
  try {
    if (wanted('sidecar') || wanted('envoy') || wanted('memory')) {
      // One sidecar and one bare server, used by the sidecar-alone and the Envoy comparisons;
      // the bare server's reply is as long as the sidecar's.
      sidecar = await startBenchSidecar({ idp, workers: ctx.workers });
      bare = await startBareProcess(Buffer.byteLength(await assertSuccessPath('oauth2-extproc', sidecar.grpcAddress)));
    }
    if (wanted('sidecar')) {
      console.log('== the sidecar alone');
      sections.push(await sidecarAlone(ctx, sidecar!, bare!));
    }
    if (wanted('workers')) {
      console.log('== server.workers');
      sections.push(await workerScaling(ctx, idp));
    }
    if ((wanted('envoy') || wanted('memory')) && tools.envoy.bin !== undefined) {
      // One Envoy per setup plus the backend, started together, each checked once.
      setups = await startSetups(ctx, idp, sidecar!, bare!);
      if (wanted('envoy')) await verifySetups(setups);
    }
    if (wanted('envoy')) {
      console.log('== through Envoy');
      sections.push(setups === undefined
        ? skipped('envoy', 'Through Envoy', `Envoy is missing (${tools.envoy.install}).`)
        : await throughEnvoy(ctx, setups));
    }
    if (wanted('modes')) {
      console.log('== SDS, ext_proc and ext_authz through Envoy');
      sections.push(await modes(ctx, idp, sidecar));
    }
    if (wanted('tokens')) {
      console.log('== token endpoint load');
      sections.push(await tokenLoad(ctx));
    }
    if (wanted('memory')) {
      console.log(`== memory (${ctx.soakSeconds} s soak)`);
      sections.push(await memory(ctx, idp, setups?.backend));
    }
    if (wanted('profile')) {
      console.log('== CPU profile');
      sections.push(await profileSidecar(ctx, idp));
    }
  } finally {
    await setups?.stop();
    await bare?.stop();
    await sidecar?.stop();
    await idp.close();
    rmSync(dir, { recursive: true, force: true });
  }

  const minutes = ((Date.now() - started) / 60_000).toFixed(1);
  const cpu = cpus();
  const viaNpm = process.env.npm_lifecycle_event === 'bench';
  const args = process.argv.slice(2).join(' ');
  const command = `${viaNpm ? 'npm run bench' : 'npx node bench/run.ts'}${args === '' ? '' : viaNpm ? ` -- ${args}` : ` ${args}`}`;
  const when = `${new Date(started).toISOString().slice(0, 16).replace('T', ' ')} UTC`;
  const setup = [
    '### Machine and versions',
    '',
    `- ${cpu.length} × ${cpu[0]?.model.trim() ?? 'unknown CPU'}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM, Linux ${release()}; other work shares this machine: read ratios, not absolutes.`,
    `- Node ${process.version}, @grpc/grpc-js ${packageVersion('@grpc/grpc-js')}; Envoy ${tools.envoy.version || 'missing'}; ${tools.h2load.version || 'h2load missing'}; ${tools.wrk.version || 'wrk missing'}.`,
    `- Last run: \`${command}\`, ${when}, ${minutes} min; each part below names the run it comes from.`,
    '',
  ].join('\n');
  // Each part says which run measured it, since `--only` rewrites some parts and not others.
  const provenance = `_Measured by \`${command}\` with BENCH_SECONDS=${ctx.seconds} BENCH_ROUNDS=${ctx.rounds} BENCH_RATE=${ctx.rate} ` +
    `BENCH_SOAK_SECONDS=${ctx.soakSeconds} BENCH_WORKERS=${ctx.workers} BENCH_ENVOY_CONCURRENCY=${ctx.envoyConcurrency}, ${when}, load average ${load.toFixed(2)} at the start._`;
  for (const s of sections) {
    if (!s.skipped) s.markdown = s.markdown.replace(/^(### [^\n]*\n)/, `$1\n${provenance}\n`);
  }
  sections.unshift({ id: 'setup', markdown: setup });

  console.log('');
  for (const s of sections) console.log(s.markdown);
  if (!values['no-write']) {
    let doc = '';
    try {
      doc = readFileSync(DOC, 'utf8');
    } catch {
      doc = '# Benchmarks\n';
    }
    for (const s of sections) if (!s.skipped) doc = replaceSection(doc, s.id, s.markdown);
    writeFileSync(DOC, doc);
    const kept = sections.filter((s) => s.skipped).map((s) => s.id);
    console.log(`Tables written to ${DOC}${kept.length > 0 ? ` (not measured, so left as they were: ${kept.join(', ')})` : ''}`);
  }
  return 0;
}

if (import.meta.main) {
  main().then((code) => {
    process.exitCode = code;
  }, (err: unknown) => {
    console.error(err instanceof Error ? err.message : err);
    process.exitCode = 1;
  });
}
