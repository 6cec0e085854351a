// A Docker engine for the container tests: found or not (the tests skip with one line naming
// what is missing), a clean copy of the tree to build from, the image built from it, and
// docker/compose commands that fail with their output.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { REPO } from '../../scripts/docker-build-check.ts';

// The Debian docker.io CLI when it is there (what ../shared/docker/setup-docker.sh installs and
// builds with); a newer CLI earlier on the PATH may lack buildx and then cannot build.
export const DOCKER = existsSync('/usr/bin/docker') ? '/usr/bin/docker' : 'docker';
const ENV = { ...process.env, DOCKER_BUILDKIT: '1', COMPOSE_DOCKER_CLI_BUILD: '1', PATH: `/usr/bin:${process.env.PATH ?? ''}` };

/** Label on every container, network and volume these tests create outside compose. */
export const TEST_LABEL = 'oauth2-extproc.test';

/**
 * Why the container tests cannot run here, or undefined when a Docker engine answers. With
 * REQUIRE_DOCKER=1 (.ci/run, which starts an engine) a missing engine is an error, not a skip.
 */
export function dockerMissing(): string | undefined {
  const missing = whyNoDocker();
  if (missing !== undefined && process.env.REQUIRE_DOCKER === '1') throw new Error(`REQUIRE_DOCKER=1, but ${missing}`);
  return missing;
}

function whyNoDocker(): string | undefined {
  const out = spawnSync(DOCKER, ['version', '--format', '{{.Server.Version}}'], { encoding: 'utf8', env: ENV, timeout: 20_000 });
  if (out.error !== undefined) return `no Docker engine: the docker CLI is not installed (${out.error.message}); bash ../shared/docker/setup-docker.sh installs and starts one`;
  if (out.status !== 0) return `no Docker engine reachable (docker version: ${(out.stderr || out.stdout).trim().split('\n').at(-1)}); start one, e.g. bash ../shared/docker/setup-docker.sh`;
  return undefined;
}

/** `docker compose` (v2) when the plugin is there, else docker-compose 1.29. */
export function composeCommand(): string[] {
  if (spawnSync(DOCKER, ['compose', 'version'], { env: ENV, stdio: 'ignore' }).status === 0) return [DOCKER, 'compose'];
  return ['docker-compose'];
}

export interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a docker command; throws with its output unless it exits 0 (or `check: false`). */
export function docker(args: string[], options: { check?: boolean; cwd?: string; timeoutMs?: number; input?: string } = {}): Run {
  const out = spawnSync(DOCKER, args, { encoding: 'utf8', env: ENV, cwd: options.cwd, timeout: options.timeoutMs ?? 300_000, input: options.input, maxBuffer: 64 * 1024 * 1024 });
  const run = { status: out.status, stdout: out.stdout ?? '', stderr: out.stderr ?? '' };
  if (options.check !== false && out.status !== 0) throw new Error(`docker ${args.join(' ')} exited ${out.status}:\n${run.stdout}${run.stderr}`);
  return run;
}

/** The same, without blocking the event loop (for commands that run while the test polls). */
export function dockerAsync(args: string[], options: { cwd?: string; command?: string[] } = {}): Promise<Run> {
  const [program, ...pre] = options.command ?? [DOCKER];
  const child = spawn(program!, [...pre, ...args], { env: ENV, cwd: options.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  return new Promise((resolve) => child.on('close', (status) => resolve({ status, stdout, stderr })));
}

/** A copy of the files git tracks (as they are in the working tree): no node_modules, dist or untracked files. */
export function cleanCopy(): string {
  const dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-tree-'));
  const files = execFileSync('git', ['ls-files', '-z'], { cwd: REPO, encoding: 'utf8' }).split('\0').filter((f) => f !== '');
  for (const file of files) {
    const source = join(REPO, file);
    if (!existsSync(source) || !statSync(source).isFile()) continue; // deleted in the working tree
    mkdirSync(dirname(join(dir, file)), { recursive: true });
    copyFileSync(source, join(dir, file));
  }
  return dir;
}

/** Builds the Dockerfile from a clean copy of the tree; returns the image's size in bytes. */
export function buildImage(tag: string): { size: number; seconds: number } {
  const dir = cleanCopy();
  const started = Date.now();
  try {
    docker(['build', '-q', '-t', tag, '.'], { cwd: dir, timeoutMs: 600_000 });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const size = Number(docker(['image', 'inspect', '--format', '{{.Size}}', tag]).stdout.trim());
  return { size, seconds: (Date.now() - started) / 1000 };
}

export const PACKAGE = JSON.parse(readFileSync(join(REPO, 'package.json'), 'utf8')) as { version: string; license: string };

/** A container's processes as the host sees them (the image has no ps). */
export function processes(container: string): Array<{ pid: number; ppid: number; uid: number; stat: string; args: string }> {
  const out = docker(['top', container, '-eo', 'pid,ppid,uid,stat,args'], { check: false });
  if (out.status !== 0) return [];
  return out.stdout.trim().split('\n').slice(1).map((line) => {
    const [pid, ppid, uid, stat, ...args] = line.trim().split(/\s+/);
    return { pid: Number(pid), ppid: Number(ppid), uid: Number(uid), stat: stat!, args: args.join(' ') };
  });
}

export function inspect(container: string): any {
  return JSON.parse(docker(['inspect', container]).stdout)[0];
}

/** Resolves true when a TCP connection to host:port succeeds (the kubelet's tcpSocket probe). */
export function tcpOpen(host: string, port: number, timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = createConnection({ host, port });
    const done = (ok: boolean): void => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(timeoutMs, () => done(false));
    socket.once('connect', () => done(true));
    socket.once('error', () => done(false));
  });
}

/** Polls `check` until it returns a value other than undefined. */
export async function waitFor<T>(what: string, check: () => Promise<T | undefined> | T | undefined, timeoutMs = 60_000, everyMs = 500): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await check();
      if (value !== undefined) return value;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${String(last)}` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** Claims of a JWT (not verified: the tests compare them with what the IdP was asked for). */
export function jwtClaims(token: string): Record<string, any> {
  return JSON.parse(Buffer.from(token.split('.')[1] ?? '', 'base64url').toString('utf8'));
}
