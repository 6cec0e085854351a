// The Dockerfile without a Docker engine: its pins and user are checked by parsing it, and its
// build steps run for real (scripts/docker-build-check.ts) into a temp folder, whose entry
// point must then start, as a non-root user that cannot write anywhere in the image.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { dockerignore, execForm, parseDockerfile, REPO, runDockerfileSteps, runEntrypoint, type BuildResult } from '../../scripts/docker-build-check.ts';

const dockerfile = readFileSync(join(REPO, 'Dockerfile'), 'utf8');
const stages = parseDockerfile(dockerfile);
const pkg = JSON.parse(readFileSync(join(REPO, 'package.json'), 'utf8')) as { version: string; license: string; dependencies: Record<string, string>; devDependencies: Record<string, string> };
const lock = JSON.parse(readFileSync(join(REPO, 'package-lock.json'), 'utf8')) as { packages: Record<string, { version: string; dev?: boolean; optional?: boolean }> };

const nodeStages = stages.filter((s) => s.from !== 'scratch');
const runtime = stages.at(-1)!;
const copiesFrom = (stage: typeof runtime): string[] => stage.instructions.filter((i) => i.keyword === 'COPY').map((i) => /--from=(\S+)/.exec(i.args)?.[1]).filter((f) => f !== undefined);
const byName = (name: string): (typeof stages)[number] => {
  const stage = stages.find((s) => s.name === name);
  assert.ok(stage, `a stage named ${name}`);
  return stage;
};
const runsOf = (stage: typeof runtime): string[] => stage.instructions.filter((i) => i.keyword === 'RUN').map((i) => i.args);

test('multi-stage, every Node stage on the same Node as the tests, pinned to the patch release', () => {
  assert.ok(stages.length >= 2, 'build stages and a runtime stage');
  const testedNode = lock.packages['node_modules/node']!.version; // the `node` devDependency
  assert.ok(nodeStages.length >= 1);
  for (const stage of nodeStages) {
    const m = /^node:(\d+\.\d+\.\d+)-(?:[a-z]+-)?(slim|alpine)$/.exec(stage.from);
    assert.ok(m, `${stage.from}: a node image pinned to major.minor.patch, slim or alpine`);
    assert.equal(m[1], testedNode, `${stage.from} runs the Node the tests run (${testedNode})`);
  }
});

test('the runtime stage: from scratch, nothing run in it, its parts copied from the Node stages', () => {
  // No base image, no RUN: no shell, npm, package manager or compiler can be in the final image.
  assert.equal(runtime.from, 'scratch');
  assert.deepEqual(runsOf(runtime), []);
  for (const from of copiesFrom(runtime)) assert.ok(nodeStages.some((s) => s.name === from), `COPY --from=${from}: a Node stage`);
  // Production dependencies come from a stage whose only install is `npm ci --omit=dev`, without scripts.
  const depsCopy = runtime.instructions.find((i) => i.keyword === 'COPY' && /\bnode_modules\b/.test(i.args));
  assert.ok(depsCopy, 'node_modules copied into the runtime');
  const deps = byName(/--from=(\S+)/.exec(depsCopy.args)![1]!);
  const installs = runsOf(deps).filter((r) => /\bnpm (ci|install)\b/.test(r));
  assert.equal(installs.length, 1);
  assert.ok(installs[0]!.includes('--omit=dev') && installs[0]!.includes('--ignore-scripts'), installs[0]);
  // From the build stage (which has the dev dependencies) only the compiled dist/.
  for (const ins of runtime.instructions.filter((i) => i.keyword === 'COPY' && i.args.includes('--from=build'))) {
    assert.match(ins.args, /^--from=build \/app\/dist\/ dist\/$/);
  }
});

test('the runtime stage: a non-root numeric user, an exec-form entry point of the CLI, a health check on /readyz', () => {
  const users = runtime.instructions.filter((i) => i.keyword === 'USER');
  assert.equal(users.length, 1);
  const [uid, gid] = users[0]!.args.split(':');
  assert.match(uid!, /^\d+$/, 'numeric, so Kubernetes can check runAsNonRoot');
  assert.notEqual(Number(uid), 0);
  assert.notEqual(Number(gid ?? uid), 0);
  const entrypoint = runtime.instructions.filter((i) => i.keyword === 'ENTRYPOINT');
  assert.equal(entrypoint.length, 1);
  assert.deepEqual(execForm(entrypoint[0]!.args), ['node', 'bin/oauth2-extproc.js']);
  const health = runtime.instructions.filter((i) => i.keyword === 'HEALTHCHECK');
  assert.equal(health.length, 1);
  assert.match(health[0]!.args, /^--interval=\S+ --timeout=\S+ --start-period=\S+ --retries=\d+ CMD \["node", "-e", /);
  assert.match(health[0]!.args, /127\.0\.0\.1:\$\{process\.env\.ADMIN_PORT \|\| 9002\}\/readyz/);
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
  if (build !== undefined) rmSync(build.outDir, { recursive: true, force: true });
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

test('the root filesystem: node, its libraries, the user, and nothing else (no shell, no npm)', () => {
  const top = readdirSync(build.root).sort();
  assert.deepEqual(top.filter((d) => !['lib', 'lib64', 'usr'].includes(d)), ['app', 'etc']);
  assert.deepEqual(readdirSync(join(build.root, 'usr', 'local', 'bin')), ['node']);
  assert.deepEqual(readdirSync(join(build.root, 'etc')).sort(), ['group', 'passwd']);
  const [uid, gid] = build.user!.split(':');
  assert.match(readFileSync(join(build.root, 'etc', 'passwd'), 'utf8'), new RegExp(`^node:x:${uid}:${gid}:`));
  for (const path of ['bin/sh', 'usr/bin/sh', 'usr/local/bin/npm', 'usr/local/lib/node_modules', 'usr/bin/apt-get']) {
    assert.ok(!existsSync(join(build.root, path)), `no ${path}`);
  }
});

test('OCI labels: source, the package version and licence', () => {
  assert.equal(build.labels['org.opencontainers.image.version'], pkg.version);
  assert.equal(build.labels['org.opencontainers.image.licenses'], pkg.license);
  assert.match(build.labels['org.opencontainers.image.source'] ?? '', /^https:\/\/\S+$/);
  assert.equal(build.labels['org.opencontainers.image.title'], 'oauth2-extproc');
});

test('the entry point runs: --version prints the package version', () => {
  const out = runEntrypoint(build, ['--version']);
  assert.equal(out.status, 0, out.stderr);
  assert.equal(out.stdout.trim(), pkg.version);
});

// As root, chroot (coreutils) runs the image's own root filesystem: its node with only the
// libraries copied next to it, as the image's user, for whom the image's files are read-only.
const chroot = process.getuid?.() === 0 ? spawnSync('sh', ['-c', 'command -v chroot'], { encoding: 'utf8' }).stdout.trim() : '';

test('the image root runs chrooted as the image user: serves, writes nothing, stops on SIGTERM with 0', { skip: chroot !== '' ? false : 'needs root and chroot (coreutils)' }, async () => {
  const [uid, gid] = build.user!.split(':');
  // Where the compose file and the pod mount the config (a bind mount in a real container).
  const configDir = join(build.root, 'etc', 'oauth2-extproc');
  mkdirSync(configDir);
  writeFileSync(join(configDir, 'config.yaml'), [
    'server: { grpc: "127.0.0.1:0", admin: "127.0.0.1:0", shutdownGraceSeconds: 1 }',
    'profiles:',
    '  default:',
    '    tokenUrl: http://127.0.0.1:9/token', // discard port: nothing listens, no token, still serves
    '    clientId: demo',
    '    clientSecret: demo',
  ].join('\n'));
  // The build ran as root and mkdtemp made the top folder 0700: open only the build's own
  // folders to the image user, never anything above them.
  for (const p of [build.outDir, build.root]) chmodSync(p, 0o755);
  const [program, ...rest] = build.entrypoint;
  const args = [...rest.map((a) => (a.startsWith('/') ? a : `${build.workdir}/${a}`)), ...build.cmd];
  const child = spawn(chroot, [`--userspec=${uid}:${gid ?? uid}`, build.root, program!, ...args], {
    env: build.env, // the image's PATH finds its node; nothing of this machine's environment
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
  }
  assert.doesNotMatch(stdout + stderr, /EACCES|EROFS|permission denied/i);
});
