// A real PHP application behind Envoy: PHP's built-in web server (`php -S`, SAPI cli-server)
// running test/fixtures/php/router.php, which answers every request with what PHP parsed from
// it ($_SERVER's HTTP_* entries, $_GET, $_POST, $_REQUEST, getallheaders()).
import { spawn, spawnSync } from 'node:child_process';
import { createServer } from 'node:net';
import { fileURLToPath } from 'node:url';

export const ROUTER_PHP = fileURLToPath(new URL('../fixtures/php/router.php', import.meta.url));

/** The skip reason when there is no PHP (one line, naming what is missing). */
export const PHP_MISSING = 'php not installed: apt-get install php-cli (or set PHP_BIN)';

/** A backend framework running as a child process on 127.0.0.1. */
export interface FrameworkBackend {
  /** `127.0.0.1:PORT`, for an Envoy cluster. */
  address: string;
  url: string;
  /** What the process printed (its own log), for a failing test's message. */
  output: string[];
  close(): Promise<void>;
}

/** PHP_BIN, else `php` on the PATH when it runs; undefined when neither does. */
export function findPhp(): string | undefined {
  const bin = process.env.PHP_BIN ?? 'php';
  const out = spawnSync(bin, ['-r', 'echo PHP_MAJOR_VERSION;'], { encoding: 'utf8' });
  return out.status === 0 && Number(out.stdout) >= 8 ? bin : undefined;
}

/** A port that was free a moment ago (php -S cannot be told to pick one). */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

export async function startPhpBackend(bin = findPhp()): Promise<FrameworkBackend> {
  if (bin === undefined) throw new Error(PHP_MISSING);
  let lastError: unknown;
  // Another process may take the port between freePort() and php binding it: try again.
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      return await startOn(bin, await freePort());
    } catch (err) {
      lastError = err;
    }
  }
  throw lastError;
}

async function startOn(bin: string, port: number): Promise<FrameworkBackend> {
  const address = `127.0.0.1:${port}`;
  // Two workers (Linux only), so that one slow request does not hold up the next. The workers
  // are php processes of their own that outlive a killed parent: the server gets a process
  // group, and close() signals the whole group.
  const child = spawn(bin, ['-S', address, ROUTER_PHP], { stdio: ['ignore', 'pipe', 'pipe'], detached: true, env: { ...process.env, PHP_CLI_SERVER_WORKERS: '2' } });
  const output: string[] = [];
  const keep = (chunk: Buffer) => {
    output.push(chunk.toString('utf8'));
    if (output.length > 200) output.splice(0, 100);
  };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  const close = async (): Promise<void> => {
    try {
      process.kill(-child.pid!, 'SIGTERM');
    } catch {
      // The group is gone already.
    }
    await exited;
  };
  await waitForHttp(`http://${address}/`, () => child.exitCode !== null || child.signalCode !== null, output, close);
  return { address, url: `http://${address}`, output, close };
}

/** Polls `url` until it answers 200; fails with the process output if it exits or stays silent. */
export async function waitForHttp(url: string, hasExited: () => boolean, output: string[], close: () => Promise<void>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (hasExited()) throw new Error(`backend exited while starting:\n${output.join('')}`);
    const res = await fetch(url).catch(() => undefined);
    if (res !== undefined) {
      await res.arrayBuffer();
      if (res.status === 200) return;
    }
    if (Date.now() > deadline) {
      await close();
      throw new Error(`backend not answering ${url} within ${timeoutMs} ms:\n${output.join('')}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}
