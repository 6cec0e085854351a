// docker-compose.sds.yml, unmodified, with a real Docker engine: SDS mode as a user runs it. A
// request through Envoy gets the sidecar's token with no key, the sidecar restarted alone goes
// unnoticed, and a sidecar that stays dead takes Envoy out of service (503) long before the last
// token it pushed expires. Same ports as docker-compose.yml (127.0.0.1:8080 and :9002).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { parse } from 'yaml';
import { REPO } from '../../scripts/docker-build-check.ts';
import { loadShippedConfig } from '../helpers/envoy.ts';
import { cleanCopy, composeCommand, docker, dockerAsync, dockerMissing, tcpOpen, jwtClaims, waitFor } from './docker.ts';

const missing = dockerMissing();
const PROJECT = `oauth2-extproc-sds-test-${process.pid}`;
const ENVOY = 'http://127.0.0.1:8080';
let dir: string | undefined;
let compose: string[];

function composeRun(args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return dockerAsync(['-p', PROJECT, '-f', 'docker-compose.sds.yml', ...args], { cwd: dir, command: compose });
}

async function composeOk(args: string[]): Promise<string> {
  const out = await composeRun(args);
  if (out.status !== 0) throw new Error(`${compose.join(' ')} ${args.join(' ')} exited ${out.status}:\n${out.stdout}${out.stderr}`);
  return out.stdout + out.stderr;
}

const containerOf = (service: string): string => docker(['ps', '-aq', '--filter', `label=com.docker.compose.project=${PROJECT}`, '--filter', `label=com.docker.compose.service=${service}`]).stdout.trim();

interface Echo { path: string; headers: Record<string, string>; query: Record<string, string> }

async function callerRequest(): Promise<{ status: number; echo?: Echo }> {
  const r = await fetch(`${ENVOY}/orders/42?subscription-key=query-key&page=2`, {
    headers: { 'Ocp-Apim-Subscription-Key': 'caller-key', Authorization: 'Bearer forged' },
    signal: AbortSignal.timeout(5000),
  });
  return r.status === 200 ? { status: 200, echo: await r.json() as Echo } : { status: r.status };
}

test('wiring, without Docker: the sidecar shares Envoy\'s loopback, its gRPC port on loopback only, where envoy-sds.yaml looks', () => {
  const compose = parse(readFileSync(join(REPO, 'docker-compose.sds.yml'), 'utf8'));
  const sidecar = compose.services['oauth2-extproc'];
  assert.equal(sidecar.network_mode, 'service:envoy');
  assert.deepEqual(compose.services.envoy.volumes, ['./envoy/envoy-sds.yaml:/etc/envoy/envoy.yaml:ro']);
  const mounted = (sidecar.volumes as string[]).find((v) => v.endsWith(':/etc/oauth2-extproc/config.yaml:ro'))!.split(':')[0]!;
  const config = parse(readFileSync(join(REPO, mounted), 'utf8'));
  const envoy = loadShippedConfig('envoy-sds.yaml');
  const cluster = (name: string): any => envoy.static_resources.clusters.find((c: any) => c.name === name).load_assignment.endpoints[0].lb_endpoints[0].endpoint;
  const sds = cluster('oauth2_extproc').address.socket_address;
  assert.equal(config.server.grpc, `${sds.address}:${sds.port_value}`);
  assert.equal(sds.address, '127.0.0.1');
  const check = cluster('backend').health_check_config.address.socket_address;
  assert.equal(config.server.admin, `0.0.0.0:${check.port_value}`);
  assert.ok((compose.services.envoy.ports as string[]).includes(`127.0.0.1:${check.port_value}:${check.port_value}`));
});

before(async () => {
  if (missing !== undefined) return;
  compose = composeCommand();
  for (const port of [8080, 9002]) assert.equal(await tcpOpen('127.0.0.1', port), false, `port ${port} is taken`);
  dir = cleanCopy();
  await composeOk(['up', '--build', '-d']);
});

after(async () => {
  if (dir === undefined) return;
  await composeRun(['down', '-v', '--remove-orphans']);
  rmSync(dir, { recursive: true, force: true });
});

test('up: a request through Envoy carries the sidecar\'s token (over SDS) and no key', { skip: missing }, async () => {
  const { echo } = await waitFor('a token through Envoy', async () => {
    const r = await callerRequest();
    return r.status === 200 ? r : undefined;
  }, 60_000);
  const [scheme, token] = echo!.headers.authorization!.split(' ');
  assert.equal(scheme, 'Bearer');
  const claims = jwtClaims(token!);
  assert.equal(claims.sub, 'orders-api');
  assert.ok(claims.exp * 1000 > Date.now());
  assert.equal(echo!.headers['ocp-apim-subscription-key'], undefined);
  assert.deepEqual(echo!.query, { page: '2' });
  const reports = await (await fetch(`${ENVOY}/reports/x`)).json() as Echo;
  assert.equal(jwtClaims(reports.headers.authorization!.split(' ')[1]!).sub, 'reports-api');
});

test('the sidecar restarted alone: every request in the meantime is served', { skip: missing }, async () => {
  const statuses: number[] = [];
  let done = false;
  const traffic = (async () => {
    while (!done) {
      statuses.push((await callerRequest().catch(() => ({ status: 0 }))).status);
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  await composeOk(['restart', 'oauth2-extproc']);
  await waitFor('the restarted sidecar ready', async () => ((await fetch('http://127.0.0.1:9002/readyz').catch(() => undefined))?.status === 200 ? true : undefined), 60_000);
  await new Promise((r) => setTimeout(r, 2000));
  done = true;
  await traffic;
  assert.ok(statuses.length > 10, String(statuses.length));
  assert.deepEqual([...new Set(statuses)], [200]);
});

test('the sidecar killed and left dead: Envoy answers 503 within seconds, its last token still valid', { skip: missing }, async () => {
  const { echo } = await callerRequest();
  const expiresAt = jwtClaims(echo!.headers.authorization!.split(' ')[1]!).exp * 1000;
  const sidecar = containerOf('oauth2-extproc');
  // SIGKILL, and no restart (a manual kill is not restarted by `restart: unless-stopped`).
  docker(['update', '--restart', 'no', sidecar]);
  docker(['kill', sidecar]);
  const killedAt = Date.now();
  const status = await waitFor('Envoy to stop forwarding', async () => {
    const r = await callerRequest();
    return r.status === 200 ? undefined : r.status;
  }, 60_000, 200);
  const stoppedAt = Date.now();
  assert.equal(status, 503);
  assert.ok(stoppedAt < expiresAt);
  console.log(`# compose: Envoy stopped forwarding ${(stoppedAt - killedAt) / 1000} s after the sidecar was killed; its last token expired ${Math.round((expiresAt - killedAt) / 1000)} s after`);
});
