// `npm test`: every test file, in three groups so that the suite's wall time is not the sum of
// its files' (most of a file's time is waiting: on a child process, on Envoy, on Docker).
//
//   1. at the same time:
//      - the unit and end-to-end files, two at a time (each file in its own process, its servers
//        on ephemeral ports, so two never share anything);
//      - test/containers/, one file at a time: two of them publish docker-compose.yml's fixed
//        host ports (8080, 9002), and their time is mostly the Docker engine's;
//   2. then, alone on the machine, the files whose subject is behaviour under saturation
//      (memory bounds, sustained load, the drain under load, the reset thresholds): what they
//      assert must not depend on what else the CPU is doing.
//
// Without a Docker engine the container files are not started: one line says why (they would
// only skip, test by test); with REQUIRE_DOCKER=1 (CI) they run and fail instead.
// `npm test -- FILE...` runs just those files, one at a time. TEST_CONCURRENCY=1 runs group 1's
// unit and end-to-end files one at a time as well.
import { spawn } from 'node:child_process';
import { globSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { dockerMissing } from '../test/containers/docker.ts';

const REPO = fileURLToPath(new URL('..', import.meta.url));
const TIMEOUT_MS = 120_000;

/** Run alone, after the others: their subject is behaviour at saturation. */
const ALONE = ['test/bounds.test.ts', 'test/e2e/load.test.ts', 'test/e2e/drain.test.ts', 'test/stream-resets.test.ts'];
const CONTAINERS = 'test/containers/';

interface Lane {
  name: string;
  files: string[];
  concurrency: number;
  /** Prefix for each output line, or undefined to pass the output through as is. */
  prefix?: string;
}

interface Outcome {
  name: string;
  files: number;
  code: number;
  seconds: number;
  /** Test counts from the lane's TAP summary (`# pass N`, …). */
  counts: Record<'pass' | 'fail' | 'cancelled' | 'skipped' | 'todo', number>;
}

function runLane(lane: Lane): Promise<Outcome> {
  const started = Date.now();
  // --test-force-exit: a file whose test failed before closing its servers (a before() that threw,
  // a timed-out await) still ends once its tests have, instead of holding the whole run forever.
  // The usual report on the terminal, and a TAP copy whose closing counts the summary adds up.
  const tap = join(mkdtempSync(join(tmpdir(), 'oauth2-extproc-test-')), 'lane.tap');
  const args = [
    '--test', '--test-force-exit', `--test-concurrency=${lane.concurrency}`, `--test-timeout=${TIMEOUT_MS}`,
    '--test-reporter=spec', '--test-reporter-destination=stdout', '--test-reporter=tap', `--test-reporter-destination=${tap}`,
    ...lane.files,
  ];
  const child = spawn(process.execPath, args, { cwd: REPO, stdio: lane.prefix === undefined ? 'inherit' : ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  if (lane.prefix !== undefined) {
    for (const [from, to] of [[child.stdout, process.stdout], [child.stderr, process.stderr]] as const) {
      let rest = '';
      from!.setEncoding('utf8');
      from!.on('data', (chunk: string) => {
        const lines = (rest + chunk).split('\n');
        rest = lines.pop()!;
        for (const line of lines) to.write(`${lane.prefix}${line}\n`);
      });
      from!.on('end', () => rest !== '' && to.write(`${lane.prefix}${rest}\n`));
    }
  }
  return new Promise((resolve) => {
    child.on('close', (code, signal) => {
      children.delete(child);
      resolve({ name: lane.name, files: lane.files.length, code: code ?? (signal ? 1 : 0), seconds: Math.round((Date.now() - started) / 1000), counts: tapCounts(tap) });
      rmSync(dirname(tap), { recursive: true, force: true });
    });
  });
}

const children = new Set<ReturnType<typeof spawn>>();
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    for (const child of children) child.kill(signal);
    process.exitCode = 1;
  });
}

/** The closing counts of a TAP report (`# pass 12`); zeros when it has none (a lane that died). */
function tapCounts(file: string): Outcome['counts'] {
  const counts = { pass: 0, fail: 0, cancelled: 0, skipped: 0, todo: 0 };
  let text = '';
  try {
    text = readFileSync(file, 'utf8');
  } catch {
    return counts;
  }
  for (const m of text.matchAll(/^# (pass|fail|cancelled|skipped|todo) (\d+)$/gm)) counts[m[1] as keyof typeof counts] = Number(m[2]);
  return counts;
}

function summary(outcomes: Outcome[]): number {
  const failed = outcomes.filter((o) => o.code !== 0);
  console.log(`\nnpm test: ${outcomes.map((o) => `${o.name} (${o.files} files) ${o.seconds} s${o.code === 0 ? '' : ` FAILED (exit ${o.code})`}`).join('; ')}`);
  const total = (key: keyof Outcome['counts']): number => outcomes.reduce((sum, o) => sum + o.counts[key], 0);
  // One closing line over every lane (each lane's own report closes with its counts only).
  console.log(`tests: ${total('pass')} passed, ${total('fail') + total('cancelled')} failed, ${total('skipped') + total('todo')} skipped`);
  return failed.length === 0 ? 0 : 1;
}

async function main(): Promise<number> {
  const chosen = process.argv.slice(2);
  if (chosen.length > 0) return summary([await runLane({ name: 'chosen files', files: chosen, concurrency: 1 })]);

  const all = globSync('test/**/*.test.ts', { cwd: REPO }).map((f) => f.split('\\').join('/')).sort();
  const missing = ALONE.filter((f) => !all.includes(f));
  if (missing.length > 0) throw new Error(`scripts/test.ts names test files that do not exist: ${missing.join(', ')}`);
  const containers = all.filter((f) => f.startsWith(CONTAINERS));
  const rest = all.filter((f) => !f.startsWith(CONTAINERS) && !ALONE.includes(f));
  const concurrency = process.env.TEST_CONCURRENCY === '1' ? 1 : 2;
  // REQUIRE_DOCKER=1: the container files run, and fail saying what is missing.
  const noDocker = process.env.REQUIRE_DOCKER === '1' ? undefined : dockerMissing();

  if (noDocker === undefined) {
    console.log(`npm test: ${rest.length} files ${concurrency} at a time, alongside ${containers.length} container files one at a time (lines marked "containers |"); then ${ALONE.length} files alone`);
  } else {
    console.log(`npm test: ${rest.length} files ${concurrency} at a time, then ${ALONE.length} files alone; the ${containers.length} container files (${containers.join(' ')}) skip: ${noDocker}`);
  }
  const first = await Promise.all([
    runLane({ name: 'unit and end-to-end', files: rest, concurrency }),
    ...(noDocker === undefined ? [runLane({ name: 'containers', files: containers, concurrency: 1, prefix: 'containers | ' })] : []),
  ]);
  if (process.exitCode) return summary(first);
  console.log(`\nnpm test: alone on the machine: ${ALONE.join(' ')}`);
  const alone = await runLane({ name: 'alone', files: ALONE, concurrency: 1 });
  return summary([...first, alone]);
}

process.exitCode = (await main()) || process.exitCode || 0;
