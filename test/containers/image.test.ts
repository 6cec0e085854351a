// The image with a real Docker engine: built from a clean copy of the tree, run as Docker runs
// it (non-root, read-only root filesystem, no capabilities, node as PID 1), and stopped the way
// Docker and Kubernetes stop it (SIGTERM, then SIGKILL after the grace period).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildImage, docker, dockerAsync, dockerMissing, inspect, PACKAGE, processes, TEST_LABEL, waitFor } from './docker.ts';

const missing = dockerMissing();
const IMAGE = 'oauth2-extproc:test';
const containers: string[] = [];
let dir: string;

before(() => {
  if (missing !== undefined) return;
  const { size, seconds } = buildImage(IMAGE);
  // The figure people judge an image by (docker images' SIZE).
  process.stdout.write(`# image ${IMAGE}: ${(size / 1e6).toFixed(0)} MB (${size} bytes), built in ${seconds.toFixed(0)} s\n`);
  dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-image-test-'));
  chmodSync(dir, 0o755);
});

after(() => {
  for (const c of containers) docker(['rm', '-f', c], { check: false });
  if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
});

/** Starts the image detached, hardened as compose and the pod run it, with `config` mounted. */
function runSidecar(name: string, config: string): string {
  const file = join(dir, `${name}.yaml`);
  writeFileSync(file, config);
  chmodSync(file, 0o644);
  const id = docker(['run', '-d', '--name', `${name}-${process.pid}`, '--label', TEST_LABEL, '--read-only', '--cap-drop', 'ALL', '--security-opt', 'no-new-privileges',
    '-v', `${file}:/etc/oauth2-extproc/config.yaml:ro`, IMAGE]).stdout.trim();
  containers.push(id);
  return id;
}

const CONFIG = (workers: number): string => [
  `server: { grpc: "0.0.0.0:9001", admin: "0.0.0.0:9002", shutdownGraceSeconds: 3, workers: ${workers} }`,
  'profiles:',
  '  default:',
  '    tokenUrl: http://127.0.0.1:9/token', // nothing listens there: no token, but it serves
  '    clientId: demo',
  '    clientSecret: demo',
].join('\n');

test('the image: labelled, a non-root numeric user, the CLI as entry point, a health check', { skip: missing }, () => {
  const config = inspect(IMAGE).Config;
  assert.equal(config.User, '1000:1000');
  assert.deepEqual(config.Entrypoint, ['node', 'bin/oauth2-extproc.js']);
  assert.deepEqual(config.Cmd, ['--config', '/etc/oauth2-extproc/config.yaml']);
  assert.equal(config.Labels['org.opencontainers.image.version'], PACKAGE.version);
  assert.equal(config.Labels['org.opencontainers.image.licenses'], PACKAGE.license);
  assert.match(config.Labels['org.opencontainers.image.source'], /^https:\/\//);
  assert.match(config.Healthcheck.Test.join(' '), /^CMD node -e .*\/readyz/);
});

test('--help and --version work in a read-only container with no capabilities', { skip: missing }, () => {
  const version = docker(['run', '--rm', '--read-only', '--cap-drop', 'ALL', IMAGE, '--version']);
  assert.equal(version.stdout, `${PACKAGE.version}\n`);
  const help = docker(['run', '--rm', '--read-only', '--cap-drop', 'ALL', IMAGE, '--help']);
  assert.match(help.stdout, /^Usage:\n {2}oauth2-extproc --config FILE/);
});

test('nothing but node in the image: no shell, no npm', { skip: missing }, () => {
  for (const program of ['sh', 'npm', 'npx', 'corepack']) {
    const out = docker(['run', '--rm', '--entrypoint', program, IMAGE, '--version'], { check: false });
    assert.notEqual(out.status, 0, `${program} runs in the image`);
    assert.match(out.stderr, /executable file not found|no such file or directory/, program);
  }
});

for (const workers of [1, 2]) {
  test(`SIGTERM to node as PID 1 (server.workers: ${workers}): drains and exits 0 within the grace period, no worker left behind`, { skip: missing }, async () => {
    const id = runSidecar(`sigterm-${workers}`, CONFIG(workers));
    const logs = (): string => docker(['logs', id]).stdout;
    await waitFor('the listening line', () => (logs().includes('"msg":"listening"') ? true : undefined), 30_000);
    const ps = await waitFor(`${workers + (workers > 1 ? 1 : 0)} processes`, () => {
      const list = processes(id);
      return list.length === workers + (workers > 1 ? 1 : 0) ? list : undefined;
    }, 30_000);
    // Everything runs as the image user; the workers are children of the primary, PID 1 inside.
    for (const p of ps) assert.equal(p.uid, 1000, p.args);
    const primary = ps.find((p) => !ps.some((q) => q.pid === p.ppid))!;
    for (const p of ps) if (p !== primary) assert.equal(p.ppid, primary.pid, `worker ${p.args} is the primary's child`);

    // `docker stop -t` sends SIGTERM, and SIGKILL (exit 137) if the container is still up after
    // the grace period: 15 s, the compose file's stop_grace_period.
    const seen: string[] = [];
    const samples: Array<Array<{ pid: number; stat: string }>> = [];
    const sampling = setInterval(() => {
      const list = processes(id);
      samples.push(list);
      for (const p of list) seen.push(`${p.pid} ${p.ppid} ${p.stat} ${p.args}`);
    }, 100);
    const stopped = await dockerAsync(['stop', '-t', '15', id]);
    assert.equal(stopped.status, 0, stopped.stderr);
    clearInterval(sampling);
    const state = inspect(id).State;
    assert.equal(state.ExitCode, 0, logs());
    assert.equal(state.OOMKilled, false);
    assert.ok(seen.length > 0, 'the process list was sampled while it drained');
    // No orphan (a worker whose parent is no longer the primary) while it drained, and no zombie:
    // a worker that has exited is reaped by the primary at once, so it is never seen exited (Z) in
    // two samples in a row. (An exited process is Z for the instant before its parent's waitpid,
    // PID 1 itself too, before the runtime reaps it: one sample may catch that.)
    assert.deepEqual(seen.filter((line) => !line.startsWith(`${primary.pid} `) && !line.includes(` ${primary.pid} `)), []);
    const lingering = samples.slice(1).flatMap((list, i) =>
      list.filter((p) => p.stat.startsWith('Z') && samples[i]!.some((q) => q.pid === p.pid && q.stat.startsWith('Z'))));
    assert.deepEqual(lingering, [], `zombies left unreaped: ${seen.filter((line) => / Z/.test(line)).join('; ')}`);
    const records = logs().trim().split('\n').map((l) => JSON.parse(l) as Record<string, any>);
    assert.ok(records.some((r) => r.msg === 'shutting down' && r.signal === 'SIGTERM'), logs());
    assert.equal(records.at(-1)!.msg, 'stopped');
  });
}
