// The Dockerfile without a Docker engine: its pins and user are checked by parsing it, and its
// build steps run for real (scripts/docker-build-check.ts) into a temp folder, whose entry
// point must then start, as a non-root user that cannot write anywhere in the image.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { dockerignore, execForm, parseDockerfile, REPO, runDockerfileSteps, runEntrypoint, type BuildResult } from '../../scripts/docker-build-check.ts';

const dockerfile = readFileSync(join(REPO, 'Dockerfile'), 'utf8');
const stages = parseDockerfile(dockerfile);
const pkg = JSON.parse(readFileSync(join(REPO, 'package.json'), 'utf8')) as { version: string; dependencies: Record<string, string>; devDependencies: Record<string, string> };
const lock = JSON.parse(readFileSync(join(REPO, 'package-lock.json'), 'utf8')) as { packages: Record<string, { version: string; dev?: boolean; optional?: boolean }> };

test('multi-stage, every stage on the same Node as the tests, pinned to the patch release', () => {
  assert.ok(stages.length >= 2, 'a build stage and a runtime stage');
  const testedNode = lock.packages['node_modules/node']!.version; // the `node` devDependency
  for (const stage of stages) {
    const m = /^node:(\d+\.\d+\.\d+)-(?:[a-z]+-)?(slim|alpine)$/.exec(stage.from);
    assert.ok(m, `${stage.from}: a node image pinned to major.minor.patch, slim or alpine`);
    assert.equal(m[1], testedNode, `${stage.from} runs the Node the tests run (${testedNode})`);
  }
});

test('the runtime stage: production dependencies only, non-root numeric user, exec-form entry point of the CLI', () => {
  const runtime = stages.at(-1)!;
  const runs = runtime.instructions.filter((i) => i.keyword === 'RUN').map((i) => i.args);
  assert.ok(runs.some((r) => /\bnpm ci\b/.test(r) && r.includes('--omit=dev') && r.includes('--ignore-scripts')), runs.join('\n'));
  assert.ok(!runs.some((r) => /\bnpm (ci|install)\b/.test(r) && !r.includes('--omit=dev')), 'no full install in the runtime stage');
  const users = runtime.instructions.filter((i) => i.keyword === 'USER');
  assert.equal(users.length, 1);
  const [uid, gid] = users[0]!.args.split(':');
  assert.match(uid!, /^\d+$/, 'numeric, so Kubernetes can check runAsNonRoot');
  assert.notEqual(Number(uid), 0);
  assert.notEqual(Number(gid ?? uid), 0);
  const entrypoint = runtime.instructions.filter((i) => i.keyword === 'ENTRYPOINT');
  assert.equal(entrypoint.length, 1);
  assert.deepEqual(execForm(entrypoint[0]!.args), ['node', 'bin/oauth2-extproc.js']);
  // The USER line comes after every RUN: nothing runs as root at run time.
  assert.ok(runtime.instructions.findIndex((i) => i.keyword === 'USER') > runtime.instructions.findLastIndex((i) => i.keyword === 'RUN'));
});

test('.dockerignore keeps the context to what the image copies', () => {
  const ignored = dockerignore(readFileSync(join(REPO, '.dockerignore'), 'utf8'));
  for (const path of ['package.json', 'package-lock.json', 'tsconfig.json', 'tsconfig.build.json', 'src/main.ts', 'bin/oauth2-extproc.js', 'proto/envoy/type/v3/http_status.proto']) {
    assert.equal(ignored(path), false, `${path} is in the context`);
  }
  for (const path of ['node_modules/yaml/package.json', 'dist/main.js', '.git/HEAD', 'test/e2e/proxy.test.ts', 'deploy/compose/client-secret.txt', 'README.md']) {
    assert.equal(ignored(path), true, `${path} is not in the context`);
  }
});

let build: BuildResult;
before(() => {
  build = runDockerfileSteps({ quiet: true });
});
after(() => {
  if (build !== undefined) rmSync(join(build.root, '..'), { recursive: true, force: true });
});

test('the build steps produce a runtime with the compiled CLI and production dependencies only', () => {
  const app = join(build.root, build.workdir);
  for (const file of ['bin/oauth2-extproc.js', 'dist/main.js', 'dist/cli.js', 'package.json', 'proto/envoy/service/ext_proc/v3/external_processor.proto']) {
    assert.ok(existsSync(join(app, file)), `${file} in the image`);
  }
  for (const dep of Object.keys(pkg.dependencies)) assert.ok(existsSync(join(app, 'node_modules', dep, 'package.json')), `${dep} installed`);
  // The lockfile marks what only the dev dependencies need: none of it may be in the image.
  const devOnly = Object.entries(lock.packages).filter(([path, p]) => path.startsWith('node_modules/') && p.dev === true).map(([path]) => path);
  assert.ok(devOnly.length > 0);
  for (const path of devOnly) assert.ok(!existsSync(join(app, path)), `${path} (dev only) not installed`);
  for (const [path, p] of Object.entries(lock.packages)) {
    if (path.startsWith('node_modules/') && p.dev !== true && p.optional !== true) assert.ok(existsSync(join(app, path)), `${path} installed`);
  }
  assert.ok(!existsSync(join(app, 'src')), 'no TypeScript sources in the image');
  assert.ok(!existsSync(join(app, 'node_modules', 'typescript')), 'no compiler in the image');
});

test('the entry point runs: --version prints the package version', () => {
  const out = runEntrypoint(build, ['--version']);
  assert.equal(out.status, 0, out.stderr);
  assert.equal(out.stdout.trim(), pkg.version);
});

// setpriv (util-linux) drops to the image's user; as that user the image's files are read-only.
const setpriv = spawnSync('setpriv', ['--version']).status === 0 && process.getuid?.() === 0;

test('the entry point serves as the image user, writing nothing in the image', { skip: setpriv ? false : 'needs root and setpriv (util-linux)' }, async () => {
  const app = join(build.root, build.workdir);
  const [uid, gid] = build.user!.split(':');
  const dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-ro-'));
  chmodSync(dir, 0o755);
  // The build ran as root: the image user may read but not write any of it. Open only the
  // build's own folders (mkdtemp made the top one 0700), never anything above them.
  const top = join(build.root, '..');
  for (const p of [top, build.root]) chmodSync(p, 0o755);
  const config = join(dir, 'config.yaml');
  writeFileSync(config, [
    'server: { grpc: "127.0.0.1:0", admin: "127.0.0.1:0", shutdownGraceSeconds: 1 }',
    'profiles:',
    '  default:',
    '    tokenUrl: http://127.0.0.1:9/token', // discard port: nothing listens, no token, still serves
    '    clientId: demo',
    '    clientSecret: demo',
  ].join('\n'));
  chmodSync(config, 0o644);
  const [program, ...rest] = build.entrypoint;
  const child = spawn('setpriv', [`--reuid=${uid}`, `--regid=${gid ?? uid}`, '--clear-groups', program === 'node' ? process.execPath : program!, ...rest, '--config', config], {
    cwd: app,
    env: { PATH: process.env.PATH ?? '', HOME: '/nonexistent', ...build.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('close', resolve));
  try {
    const listening = await new Promise<Record<string, any>>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no "listening" line:\n${stdout}\n${stderr}`)), 15_000);
      const check = (): void => {
        const line = stdout.split('\n').find((l) => l.includes('"msg":"listening"'));
        if (line !== undefined) {
          clearTimeout(timer);
          resolve(JSON.parse(line));
        }
      };
      child.stdout.on('data', check);
      void exited.then((code) => reject(new Error(`exited ${code}:\n${stdout}\n${stderr}`)));
    });
    const health = await fetch(`http://${listening.admin}/healthz`);
    assert.equal(health.status, 200);
    const ready = await fetch(`http://${listening.admin}/readyz`);
    assert.equal(ready.status, 503, 'no token: not ready');
  } finally {
    child.kill('SIGTERM');
    assert.equal(await exited, 0, `${stdout}\n${stderr}`);
    rmSync(dir, { recursive: true, force: true });
  }
  assert.doesNotMatch(stdout + stderr, /EACCES|EROFS|permission denied/i);
});
