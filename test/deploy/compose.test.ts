// docker-compose.yml without a Docker engine: valid against the Compose specification's JSON
// schema (the copy bundled in dclint, every error listed), and wired consistently: Envoy runs
// the same envoy/envoy.yaml as the end-to-end tests, whose clusters name the compose services
// on the ports those services listen on; the sidecar's mounted config passes check-config.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { Ajv } from 'ajv';
import { parse } from 'yaml';
import { REPO } from '../../scripts/docker-build-check.ts';
import { envoyVersion, findEnvoy, loadShippedConfig } from '../helpers/envoy.ts';
import { runCli } from '../helpers/sidecar.ts';

const require = createRequire(import.meta.url);
const schema = JSON.parse(readFileSync(join(dirname(require.resolve('dclint/package.json')), 'schemas', 'compose.schema.json'), 'utf8'));
delete schema.$schema; // draft-07 by URL, which ajv 8 knows under another id
const validateCompose = new Ajv({ allErrors: true, strict: false, allowUnionTypes: true, validateFormats: false }).compile(schema);

function schemaErrors(doc: unknown): string[] {
  return validateCompose(doc) ? [] : (validateCompose.errors ?? []).map((e) => `${e.instancePath || '/'} ${e.message ?? ''} ${JSON.stringify(e.params)}`);
}

const composeText = readFileSync(join(REPO, 'docker-compose.yml'), 'utf8');
const compose = parse(composeText);
const services = compose.services as Record<string, any>;
const envoyConfig = loadShippedConfig('envoy.yaml');

function endpoint(clusterName: string): { address: string; port_value: number } {
  const cluster = envoyConfig.static_resources.clusters.find((c: any) => c.name === clusterName);
  return cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address;
}

/** `./host:/container[:ro]` volumes as [host, container]. */
function binds(service: any): Array<[string, string]> {
  return (service.volumes ?? []).map((v: string) => v.split(':').slice(0, 2) as [string, string]);
}

const sidecarConfigPath = binds(services['oauth2-extproc']).find(([, c]) => c === '/etc/oauth2-extproc/config.yaml')?.[0];
const sidecarConfig = parse(readFileSync(join(REPO, sidecarConfigPath ?? 'missing'), 'utf8'));

test('docker-compose.yml is valid against the Compose specification schema', () => {
  assert.deepEqual(schemaErrors(compose), []);
});

test('the schema check reports every error of a broken file (it can fail)', () => {
  const broken = parse(composeText);
  broken.services.envoy.ports = 8080;
  broken.services.envoy.imagee = 'typo';
  broken.services.backend.environment = 'HTTP_PORT';
  const errors = schemaErrors(broken);
  assert.ok(errors.some((e) => e.startsWith('/services/envoy/ports ')), errors.join('\n'));
  assert.ok(errors.some((e) => e.includes('"additionalProperty":"imagee"')), errors.join('\n'));
  assert.ok(errors.some((e) => e.startsWith('/services/backend/environment ')), errors.join('\n'));
});

test('every image is pinned to a version', () => {
  for (const [name, service] of Object.entries(services)) {
    if (service.build !== undefined) continue;
    assert.match(service.image, /:[a-z-]*v?\d+(\.\d+)*$/, `${name}: ${service.image}`);
  }
});

test('Envoy: the official image, at the version the end-to-end tests run', { skip: findEnvoy() === undefined ? 'no Envoy binary to compare with' : false }, () => {
  const m = /^envoyproxy\/envoy:(?:distroless-)?v(\d+\.\d+)\.\d+$/.exec(services.envoy.image);
  assert.ok(m, services.envoy.image);
  // The same release line (a patch release of either side does not change the config's meaning).
  assert.equal(m[1], envoyVersion(findEnvoy()!).split('.').slice(0, 2).join('.'));
});

test('Envoy runs envoy/envoy.yaml itself, the file the end-to-end tests run', () => {
  const envoy = services.envoy;
  const configArg = envoy.command[envoy.command.indexOf('--config-path') + 1];
  assert.deepEqual(binds(envoy).find(([, c]) => c === configArg), ['./envoy/envoy.yaml', configArg]);
  // Published on the host's loopback, on the listener's port.
  assert.deepEqual(envoy.ports, [`127.0.0.1:8080:${envoyConfig.static_resources.listeners[0].address.socket_address.port_value}`]);
  assert.deepEqual(Object.keys(envoy.depends_on).sort(), ['backend', 'oauth2-extproc']);
  assert.equal(envoy.depends_on['oauth2-extproc'].condition, 'service_healthy');
});

test("envoy.yaml's clusters are compose services, on the ports they listen on", () => {
  const extproc = endpoint('oauth2_extproc');
  assert.ok(services[extproc.address], `a service named ${extproc.address}`);
  assert.equal(sidecarConfig.server.grpc, `0.0.0.0:${extproc.port_value}`);
  const backend = endpoint('backend');
  assert.ok(services[backend.address], `a service named ${backend.address}`);
  assert.equal(services[backend.address].environment.HTTP_PORT, String(backend.port_value));
});

test('the sidecar: built from the Dockerfile, its health check on its admin port, hardened', () => {
  const sidecar = services['oauth2-extproc'];
  assert.deepEqual(sidecar.build, { context: '.', dockerfile: 'Dockerfile' });
  assert.deepEqual(sidecar.command, ['--config', '/etc/oauth2-extproc/config.yaml']);
  const adminPort = sidecarConfig.server.admin.split(':').at(-1);
  // The image's HEALTHCHECK, on the admin port of this config (only its timing is set here).
  assert.equal(sidecar.healthcheck.test, undefined);
  const healthcheck = readFileSync(join(REPO, 'Dockerfile'), 'utf8').split('\n').filter((l) => /^\s*(HEALTHCHECK|CMD \["node")/.test(l)).join(' ');
  assert.match(healthcheck, new RegExp(`127\\.0\\.0\\.1:\\$\\{process\\.env\\.ADMIN_PORT \\|\\| ${adminPort}\\}/readyz`));
  assert.equal(sidecar.environment?.ADMIN_PORT, undefined);
  assert.deepEqual(sidecar.ports, [`127.0.0.1:${adminPort}:${adminPort}`]);
  for (const name of ['envoy', 'oauth2-extproc']) {
    assert.equal(services[name].read_only, true, name);
    assert.deepEqual(services[name].cap_drop, ['ALL'], name);
  }
});

test("the sidecar's profiles: one per profile Envoy's routes name, tokens from the compose IdP", () => {
  const named = new Set(['default']);
  JSON.stringify(envoyConfig, (key, value) => {
    if (key === 'grpc_initial_metadata') for (const m of value) if (m.key === 'x-oauth2-profile') named.add(m.value);
    return value;
  });
  assert.deepEqual(Object.keys(sidecarConfig.profiles).sort(), [...named].sort());
  for (const profile of Object.values(sidecarConfig.profiles) as any[]) {
    assert.ok(services[new URL(profile.tokenUrl).hostname], profile.tokenUrl);
  }
});

test('every file compose mounts exists, and the mounted sidecar config passes check-config', async () => {
  for (const service of Object.values(services)) {
    for (const [host] of binds(service)) assert.ok(existsSync(join(REPO, host)), host);
  }
  const secrets = compose.secrets as Record<string, { file: string }>;
  for (const { file } of Object.values(secrets)) assert.ok(existsSync(join(REPO, file)), file);

  // /run/secrets/NAME is where compose mounts a secret: put the files there for the check.
  const dir = mkdtempSync(join(tmpdir(), 'compose-check-'));
  for (const [name, { file }] of Object.entries(secrets)) copyFileSync(join(REPO, file), join(dir, name));
  const config = join(dir, 'config.yaml');
  writeFileSync(config, readFileSync(join(REPO, sidecarConfigPath!), 'utf8').replaceAll('/run/secrets/', `${dir}/`));
  const out = await runCli(['check-config', '--config', config]);
  rmSync(dir, { recursive: true, force: true });
  assert.equal(out.code, 0, out.stderr);
  assert.doesNotMatch(out.stdout, /local-demo-secret/, 'check-config prints no secret');
});
