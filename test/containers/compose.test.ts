// The shipped docker-compose.yml, unmodified, with a real Docker engine: up as the README says,
// a request through Envoy's published port, the sidecar restarted alone, and down -v leaving
// nothing of the project behind. Run under a project name of its own, from a clean copy of the
// tree; the published ports are the file's (127.0.0.1:8080 and :9002), so they must be free.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { cleanCopy, composeCommand, docker, dockerAsync, dockerMissing, inspect, jwtClaims, tcpOpen, waitFor } from './docker.ts';

const missing = dockerMissing();
const PROJECT = `oauth2-extproc-test-${process.pid}`;
const ENVOY = 'http://127.0.0.1:8080';
let dir: string | undefined;
let compose: string[];

function composeRun(args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return dockerAsync(['-p', PROJECT, ...args], { cwd: dir, command: compose });
}

async function composeOk(args: string[]): Promise<string> {
  const out = await composeRun(args);
  if (out.status !== 0) throw new Error(`${compose.join(' ')} ${args.join(' ')} exited ${out.status}:\n${out.stdout}${out.stderr}`);
  return out.stdout + out.stderr;
}

/** What the project still owns on the engine: containers, networks, volumes. */
function leftovers(): string[] {
  const filter = `label=com.docker.compose.project=${PROJECT}`;
  return [
    ...docker(['ps', '-aq', '--filter', filter]).stdout.split('\n').filter(Boolean).map((id) => `container ${id}`),
    ...docker(['network', 'ls', '-q', '--filter', filter]).stdout.split('\n').filter(Boolean).map((id) => `network ${id}`),
    ...docker(['volume', 'ls', '-q', '--filter', filter]).stdout.split('\n').filter(Boolean).map((id) => `volume ${id}`),
  ];
}

const containerOf = (service: string): string => docker(['ps', '-q', '--filter', `label=com.docker.compose.project=${PROJECT}`, '--filter', `label=com.docker.compose.service=${service}`]).stdout.trim();

/** The README's curl: a subscription key in a header and in the query, and a forged Authorization. */
async function callerRequest(): Promise<Response> {
  return fetch(`${ENVOY}/orders/42?subscription-key=query-key&page=2`, {
    headers: { 'Ocp-Apim-Subscription-Key': 'caller-key', Authorization: 'Bearer forged' },
    signal: AbortSignal.timeout(5000),
  });
}

before(async () => {
  if (missing !== undefined) return;
  compose = composeCommand();
  for (const port of [8080, 9002]) {
    assert.equal(await tcpOpen('127.0.0.1', port), false, `port ${port} is taken: docker-compose.yml publishes it, so nothing else may listen there during this test`);
  }
  dir = cleanCopy();
  await composeOk(['up', '--build', '-d']);
});

after(async () => {
  if (dir === undefined) return;
  await composeRun(['down', '-v', '--remove-orphans']);
  rmSync(dir, { recursive: true, force: true });
});

test('docker compose up: a request through Envoy reaches the backend with a fresh token and without the key', { skip: missing }, async () => {
  // compose starts Envoy once the sidecar's health check (the image's HEALTHCHECK) passes.
  assert.equal(inspect(containerOf('oauth2-extproc')).State.Health.Status, 'healthy');
  const res = await waitFor('Envoy on 127.0.0.1:8080', async () => {
    const r = await callerRequest();
    return r.status === 200 ? r : undefined;
  }, 60_000);
  const echo = await res.json() as { path: string; headers: Record<string, string>; query: Record<string, string> };
  const [scheme, token] = echo.headers.authorization!.split(' ');
  assert.equal(scheme, 'Bearer');
  const claims = jwtClaims(token!);
  // Issued just now by the compose file's IdP for the default profile's client and scope.
  assert.equal(claims.iss, 'http://idp:8080/default');
  assert.equal(claims.sub, 'orders-api');
  assert.equal(claims.aud, 'api://orders/.default');
  assert.ok(claims.exp * 1000 > Date.now());
  assert.equal(echo.headers['ocp-apim-subscription-key'], undefined);
  assert.deepEqual(echo.query, { page: '2' });
  assert.equal(echo.path, '/orders/42');
  // The reports route gets the reports profile's token.
  const reports = await (await fetch(`${ENVOY}/reports/x`, { headers: { 'Ocp-Apim-Subscription-Key': 'caller-key' } })).json() as { headers: Record<string, string> };
  assert.equal(jwtClaims(reports.headers.authorization!.split(' ')[1]!).sub, 'reports-api');
  // The admin port is published on the host's loopback too.
  assert.equal((await fetch('http://127.0.0.1:9002/readyz')).status, 200);
});

test('restarting the sidecar alone: Envoy (not restarted) serves tokens again', { skip: missing }, async () => {
  const envoy = containerOf('envoy');
  const envoyBefore = inspect(envoy).State;
  await composeOk(['restart', 'oauth2-extproc']);
  const echo = await waitFor('a token through Envoy after the restart', async () => {
    const r = await callerRequest();
    return r.status === 200 ? await r.json() as { headers: Record<string, string> } : undefined;
  }, 60_000);
  assert.match(echo.headers.authorization!, /^Bearer eyJ/);
  assert.equal(echo.headers['ocp-apim-subscription-key'], undefined);
  const envoyAfter = inspect(envoy).State;
  assert.equal(containerOf('envoy'), envoy, 'the same Envoy container');
  assert.equal(envoyAfter.StartedAt, envoyBefore.StartedAt, 'Envoy was not restarted');
});

test('docker compose down -v leaves no container, network or volume of the project', { skip: missing }, async () => {
  assert.notDeepEqual(leftovers(), [], 'the project is up before');
  await composeOk(['down', '-v']);
  assert.deepEqual(leftovers(), []);
  assert.equal(await tcpOpen('127.0.0.1', 8080), false, 'port 8080 is free again');
});
