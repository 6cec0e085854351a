// A real Python WSGI application behind Envoy: test/fixtures/wsgi/app.py on the standard
// library's wsgiref.simple_server (nothing to pip install), answering every request with what
// WSGI made of it (the environ's HTTP_* keys, PATH_INFO, parse_qs of QUERY_STRING).
import { spawn, spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { waitForHttp, type FrameworkBackend } from './php-backend.ts';

export const APP_PY = fileURLToPath(new URL('../fixtures/wsgi/app.py', import.meta.url));

/** The skip reason when there is no Python 3. */
export const PYTHON_MISSING = 'python3 not installed: apt-get install python3 (or set PYTHON_BIN)';

/** PYTHON_BIN, else `python3` on the PATH when it runs wsgiref; undefined otherwise. */
export function findPython(): string | undefined {
  const bin = process.env.PYTHON_BIN ?? 'python3';
  const out = spawnSync(bin, ['-c', 'import wsgiref.simple_server, sys; print(sys.version_info[0])'], { encoding: 'utf8' });
  return out.status === 0 && out.stdout.trim() === '3' ? bin : undefined;
}

export async function startWsgiBackend(bin = findPython()): Promise<FrameworkBackend> {
  if (bin === undefined) throw new Error(PYTHON_MISSING);
  // -u: the port line is not held in a buffer.
  const child = spawn(bin, ['-u', APP_PY], { stdio: ['ignore', 'pipe', 'pipe'] });
  const output: string[] = [];
  child.stderr!.on('data', (chunk: Buffer) => {
    output.push(chunk.toString('utf8'));
    if (output.length > 200) output.splice(0, 100);
  });
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  const close = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    await exited;
  };
  // The app prints the port the kernel gave it (it binds port 0) as its first line.
  const port = await new Promise<number>((resolve, reject) => {
    let buffered = '';
    const timer = setTimeout(() => reject(new Error(`app.py printed no port within 10 s:\n${output.join('')}`)), 10_000);
    child.stdout!.on('data', (chunk: Buffer) => {
      buffered += chunk.toString('utf8');
      const nl = buffered.indexOf('\n');
      if (nl >= 0) {
        clearTimeout(timer);
        resolve(Number(buffered.slice(0, nl)));
      }
    });
    void exited.then(() => {
      clearTimeout(timer);
      reject(new Error(`app.py exited while starting:\n${output.join('')}`));
    });
  }).catch(async (err: unknown) => {
    await close();
    throw err;
  });
  const address = `127.0.0.1:${port}`;
  await waitForHttp(`http://${address}/`, () => child.exitCode !== null || child.signalCode !== null, output, close);
  return { address, url: `http://${address}`, output, close };
}
