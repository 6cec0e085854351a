// Starts the real sidecar through its CLI (`node src/main.ts --config FILE`) on ephemeral ports,
// and collects what it prints.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';

export const MAIN = fileURLToPath(new URL('../../src/main.ts', import.meta.url));

export interface SidecarProcess {
  child: ChildProcess;
  /** `127.0.0.1:PORT` (or `unix:/path`) of the ext_proc server. */
  grpcAddress: string;
  adminUrl: string;
  /** Every stdout line so far (JSON log records). */
  stdout: string[];
  stderr: string[];
  /** Parsed log records. */
  logs(): Array<Record<string, any>>;
  /** Resolves when a log line matches. */
  waitForLog(match: (record: Record<string, any>) => boolean, timeoutMs?: number): Promise<Record<string, any>>;
  /** Sends a signal (SIGTERM by default) and resolves with the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
  exited: Promise<number | null>;
}

export interface StartOptions {
  /** The config as an object (written as YAML) or YAML text. Ports default to 0. */
  config: Record<string, any> | string;
  env?: NodeJS.ProcessEnv;
  /** Wait for /readyz to answer 200 (default), or only for the listeners. */
  waitReady?: boolean;
  dir?: string;
  /** The script node runs; by default src/main.ts (the benchmarks run the built bin/). */
  entry?: string;
}

export function writeConfig(config: Record<string, any> | string, dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-'))): string {
  const file = join(dir, 'config.yaml');
  if (typeof config === 'string') {
    writeFileSync(file, config);
  } else {
    const withPorts = { ...config, server: { grpc: '127.0.0.1:0', admin: '127.0.0.1:0', ...config.server } };
    writeFileSync(file, stringify(withPorts));
  }
  return file;
}

/** Runs a one-shot CLI command and collects its output. */
export async function runCli(args: string[], env?: NodeJS.ProcessEnv): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [MAIN, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (c: Buffer) => (stdout += c.toString('utf8')));
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  return { code, stdout, stderr };
}

export async function startSidecar(options: StartOptions): Promise<SidecarProcess> {
  const file = writeConfig(options.config, options.dir);
  const child = spawn(process.execPath, [options.entry ?? MAIN, '--config', file], {
    env: { ...process.env, ...options.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  // The temporary folder is ours unless the caller chose it.
  if (options.dir === undefined) child.on('close', () => rmSync(dirname(file), { recursive: true, force: true }));
  const stdout: string[] = [];
  const stderr: string[] = [];
  const waiters: Array<{ match: (r: Record<string, any>) => boolean; resolve: (r: Record<string, any>) => void }> = [];
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));

  let buffered = '';
  child.stdout!.on('data', (chunk: Buffer) => {
    buffered += chunk.toString('utf8');
    let nl: number;
    while ((nl = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      stdout.push(line);
      let record: Record<string, any>;
      try {
        record = JSON.parse(line);
      } catch {
        continue;
      }
      for (const w of [...waiters]) {
        if (w.match(record)) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(record);
        }
      }
    }
  });
  child.stderr!.on('data', (chunk: Buffer) => stderr.push(chunk.toString('utf8')));

  const parse = (): Array<Record<string, any>> =>
    stdout.flatMap((l) => {
      try {
        return [JSON.parse(l)];
      } catch {
        return [];
      }
    });

  const waitForLog = (match: (r: Record<string, any>) => boolean, timeoutMs = 15_000): Promise<Record<string, any>> => {
    const found = parse().find(match);
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no matching log line within ${timeoutMs} ms; stdout:\n${stdout.join('\n')}\nstderr:\n${stderr.join('')}`)), timeoutMs);
      waiters.push({ match, resolve: (r) => { clearTimeout(timer); resolve(r); } });
      void exited.then((code) => {
        clearTimeout(timer);
        reject(new Error(`sidecar exited (${code}) before the expected log line; stderr:\n${stderr.join('')}\nstdout:\n${stdout.join('\n')}`));
      });
    });
  };

  const listening = await waitForLog((r) => r.msg === 'listening');
  const adminUrl = `http://${listening.admin}`;
  if (options.waitReady ?? true) await waitForLog((r) => typeof r.msg === 'string' && r.msg.startsWith('ready'));

  return {
    child,
    grpcAddress: listening.grpc,
    adminUrl,
    stdout,
    stderr,
    logs: parse,
    waitForLog,
    exited,
    async stop(signal = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
  };
}

/** A config with one `default` profile pointing at a test OAuth server's `post` client. */
export function profileFor(server: { tokenUrl: string; clients: { post: { clientId: string; clientSecret: string } } }, extra: Record<string, any> = {}): Record<string, any> {
  return {
    tokenUrl: server.tokenUrl,
    clientId: server.clients.post.clientId,
    clientSecret: server.clients.post.clientSecret,
    scope: 'api://orders/.default',
    ...extra,
  };
}
