// `npm start -- --config FILE`, the README's way to run the sidecar from a checkout: a SIGTERM
// to npm (what a process manager sends) and a Ctrl-C (SIGINT to the terminal's whole process
// group) stop the sidecar itself, which drains and frees its ports; nothing is left running.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { dirname } from 'node:path';
import { REPO } from '../../scripts/docker-build-check.ts';
import { startOAuthServer, type OAuthServer } from '../helpers/oauth-server.ts';
import { profileFor, writeConfig } from '../helpers/sidecar.ts';

const npm = spawnSync('npm', ['--version'], { encoding: 'utf8' }).status === 0;
let idp: OAuthServer;
before(async () => {
  idp = await startOAuthServer();
});
after(async () => {
  await idp.close();
});

/** Every process below `pid` (from /proc: Linux). */
function descendants(pid: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of readdirSync('/proc').filter((e) => /^\d+$/.test(e))) {
    try {
      const ppid = Number(/^\d+ \(.*\) \S+ (\d+)/s.exec(readFileSync(`/proc/${entry}/stat`, 'utf8'))![1]);
      children.set(ppid, [...(children.get(ppid) ?? []), Number(entry)]);
    } catch {
      // gone meanwhile
    }
  }
  const out: number[] = [];
  const walk = (p: number): void => {
    for (const c of children.get(p) ?? []) {
      out.push(c);
      walk(c);
    }
  };
  walk(pid);
  return out;
}

const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

const freePort = (port: number): Promise<boolean> => new Promise((resolve) => {
  const server = createServer().once('error', () => resolve(false)).listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
});

for (const [how, signal] of [['SIGTERM to npm', 'SIGTERM'], ['Ctrl-C (SIGINT to the process group)', 'SIGINT']] as const) {
  test(`npm start: ${how} stops the sidecar, and its ports are free`, { skip: npm ? false : 'npm not on the PATH' }, async () => {
    const config = writeConfig({ server: { shutdownGraceSeconds: 2 }, profiles: { default: profileFor(idp) } });
    // Its own process group, as a shell in a terminal gives a foreground job.
    const child = spawn('npm', ['start', '--', '--config', config], { cwd: REPO, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    // npm's own exit ('close' would also wait for whatever still holds its output pipes).
    const exited = new Promise<number | null>((resolve) => child.on('exit', resolve));
    const closed = new Promise<void>((resolve) => child.on('close', () => resolve()));
    let below: number[] = [];
    try {
      const listening = await new Promise<Record<string, any>>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no "listening" line:\n${stdout}\n${stderr}`)), 30_000);
        child.stdout.on('data', () => {
          const line = stdout.split('\n').find((l) => l.includes('"msg":"listening"'));
          if (line !== undefined) {
            clearTimeout(timer);
            resolve(JSON.parse(line));
          }
        });
        void exited.then((code) => reject(new Error(`npm exited ${code}:\n${stdout}\n${stderr}`)));
      });
      // Ready (it holds a token): up and running, its signal handlers in place.
      for (let i = 0; i < 100 && (await fetch(`http://${listening.admin}/readyz`)).status !== 200; i++) await new Promise((r) => setTimeout(r, 100));
      below = descendants(child.pid!);
      assert.ok(below.length > 0, 'the sidecar runs below npm');
      if (signal === 'SIGTERM') child.kill('SIGTERM');
      else process.kill(-child.pid!, 'SIGINT');
      const code = await exited;
      // Whatever npm left behind has the sidecar's grace period (2 s) and more to go.
      for (let i = 0; i < 50 && below.some(alive); i++) await new Promise((r) => setTimeout(r, 200));
      assert.deepEqual(below.filter(alive), [], 'no process left running');
      await closed;
      assert.equal(code, 0, `${stdout}\n${stderr}`);
      assert.match(stdout, new RegExp(`"signal":"${signal}".*"msg":"shutting down"`));
      assert.match(stdout.trim().split('\n').at(-1)!, /"msg":"stopped"/);
      for (const address of [listening.grpc, listening.admin] as string[]) {
        assert.equal(await freePort(Number(address.split(':').at(-1))), true, `${address} is free`);
      }
    } finally {
      for (const pid of [child.pid!, ...below]) if (alive(pid)) process.kill(pid, 'SIGKILL');
      rmSync(dirname(config), { recursive: true, force: true });
    }
  });
}
