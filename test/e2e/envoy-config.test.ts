// The shipped Envoy configs: accepted by the real Envoy (`--mode validate`), consistent with
// each other, and set up the way the sidecar needs (fail closed, request headers only, …).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ENVOY_DIR, ENVOY_MISSING, findEnvoy, loadShippedConfig, maskAddresses, rewriteEnvoyConfig } from '../helpers/envoy.ts';

const envoy = findEnvoy();
// In CI a missing Envoy is a failure (.ci/run installs it); on a laptop, a skip with the hint.
const skip = envoy === undefined && !process.env.CI ? ENVOY_MISSING : false;
const SHIPPED = readdirSync(ENVOY_DIR).filter((f) => f.endsWith('.yaml')).sort();
/** The other modes (docs/modes.md) have tests of their own: test/e2e/sds.test.ts, ext-authz.test.ts. */
const EXT_PROC = SHIPPED.filter((f) => f !== 'envoy-sds.yaml' && f !== 'envoy-ext-authz.yaml');

function validate(file: string): { code: number | null; output: string } {
  if (envoy === undefined) throw new Error(ENVOY_MISSING);
  const out = spawnSync(envoy, ['--mode', 'validate', '--config-path', file, '--log-level', 'error'], { encoding: 'utf8' });
  return { code: out.status, output: `${out.stdout}${out.stderr}` };
}

test('envoy/ ships the TCP, Unix socket and minimal configs, and one each for SDS and ext_authz', () => {
  assert.deepEqual(SHIPPED, ['envoy-ext-authz.yaml', 'envoy-minimal.yaml', 'envoy-sds.yaml', 'envoy-uds.yaml', 'envoy.yaml']);
});

for (const file of SHIPPED) {
  test(`envoy --mode validate accepts envoy/${file}`, { skip }, () => {
    const { code, output } = validate(join(ENVOY_DIR, file));
    assert.equal(code, 0, output);
    assert.match(output, /OK/);
  });
}

test('envoy --mode validate rejects a misspelt field (the check can fail)', { skip }, () => {
  const dir = mkdtempSync(join(tmpdir(), 'envoy-validate-'));
  const bad = join(dir, 'bad.yaml');
  writeFileSync(bad, readFileSync(join(ENVOY_DIR, 'envoy.yaml'), 'utf8').replace('failure_mode_allow: false', 'failure_mode_alow: false'));
  const { code, output } = validate(bad);
  rmSync(dir, { recursive: true, force: true });
  assert.notEqual(code, 0);
  assert.match(output, /no\s+such\s+field:\s+'failure_mode_alow'/);
});

function extProcFilter(doc: any): any {
  const hcm = doc.static_resources.listeners[0].filter_chains[0].filters[0].typed_config;
  return hcm.http_filters.find((f: any) => f.name === 'envoy.filters.http.ext_proc');
}

function routes(doc: any): any[] {
  return doc.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes;
}

function cluster(doc: any, name: string): any {
  return doc.static_resources.clusters.find((c: any) => c.name === name);
}

for (const file of EXT_PROC) {
  test(`${file}: ext_proc before the router, fail closed, request headers only`, () => {
    const doc = loadShippedConfig(file);
    const hcm = doc.static_resources.listeners[0].filter_chains[0].filters[0].typed_config;
    assert.deepEqual(hcm.http_filters.map((f: any) => f.name), ['envoy.filters.http.ext_proc', 'envoy.filters.http.router']);
    const filter = extProcFilter(doc).typed_config;
    assert.equal(filter.failure_mode_allow, false);
    assert.deepEqual(filter.grpc_service, { envoy_grpc: { cluster_name: 'oauth2_extproc' } });
    assert.equal(filter.processing_mode.request_header_mode, 'SEND');
    assert.equal(filter.processing_mode.response_header_mode, 'SKIP');
    for (const [mode, value] of Object.entries(filter.processing_mode)) {
      if (mode !== 'request_header_mode') assert.ok(value === 'SKIP' || value === 'NONE', `${mode}: ${String(value)}`);
    }
    // HTTP/2 to the sidecar.
    const options = cluster(doc, 'oauth2_extproc').typed_extension_protocol_options['envoy.extensions.upstreams.http.v3.HttpProtocolOptions'];
    assert.ok(options.explicit_http_config.http2_protocol_options);
  });
}

for (const file of ['envoy.yaml', 'envoy-uds.yaml']) {
  test(`${file}: tuned for the sidecar (connection bound, circuit breakers, graceful close, per-route settings)`, () => {
    const doc = loadShippedConfig(file);
    assert.equal(doc.layered_runtime.layers[0].static_layer['envoy.reloadable_features.ext_proc_graceful_grpc_close'], true);
    const filter = extProcFilter(doc).typed_config;
    assert.equal(filter.mutation_rules.disallow_is_error, true);
    assert.ok(filter.message_timeout);
    const extproc = cluster(doc, 'oauth2_extproc');
    const max = extproc.typed_extension_protocol_options['envoy.extensions.upstreams.http.v3.HttpProtocolOptions'].common_http_protocol_options.max_requests_per_connection;
    assert.ok(max > 0 && max <= 1000, `max_requests_per_connection ${max} keeps every connection under Node's 1,000-reset burst`);
    for (const t of extproc.circuit_breakers.thresholds) assert.ok(t.max_requests > 1024 && t.max_pending_requests > 1024);

    const byMatch = new Map(routes(doc).map((r: any) => [JSON.stringify(r.match), r]));
    const health = byMatch.get(JSON.stringify({ path: '/healthz', headers: [{ name: ':path', string_match: { exact: '/healthz' } }] }));
    assert.equal(health.typed_per_filter_config['envoy.filters.http.ext_proc'].disabled, true);
    assert.deepEqual(health.request_headers_to_remove, ['authorization', 'ocp-apim-subscription-key']);
    const reports = byMatch.get(JSON.stringify({ prefix: '/reports/' }));
    assert.deepEqual(reports.typed_per_filter_config['envoy.filters.http.ext_proc'].overrides.grpc_initial_metadata, [{ key: 'x-oauth2-profile', value: 'reports' }]);
    // The last route catches everything, with the default profile.
    assert.deepEqual(routes(doc).at(-1), { match: { prefix: '/' }, route: { cluster: 'backend' } });
  });
}

test('envoy-uds.yaml differs from envoy.yaml only in how the clusters are reached', () => {
  const tcp = loadShippedConfig('envoy.yaml');
  const uds = loadShippedConfig('envoy-uds.yaml');
  assert.deepEqual(uds.admin, tcp.admin);
  assert.deepEqual(uds.layered_runtime, tcp.layered_runtime);
  assert.deepEqual(uds.static_resources.listeners, tcp.static_resources.listeners);
  const sameSettings = (c: any) => {
    const { type, dns_lookup_family, load_assignment, ...rest } = c;
    return rest;
  };
  assert.deepEqual(uds.static_resources.clusters.map(sameSettings), tcp.static_resources.clusters.map(sameSettings));
  assert.equal(cluster(uds, 'oauth2_extproc').load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe.path, '/var/run/oauth2-extproc/extproc.sock');
  assert.deepEqual(cluster(uds, 'backend').load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address, { address: '127.0.0.1', port_value: 8081 });
});

test('the tests rewrite addresses, ports and paths only, and refuse a cluster they cannot place', () => {
  const shipped = loadShippedConfig('envoy.yaml');
  const rewritten = rewriteEnvoyConfig(shipped, { oauth2_extproc: '127.0.0.1:4001', backend: '127.0.0.1:4002' });
  assert.deepEqual(maskAddresses(rewritten), maskAddresses(shipped));
  assert.deepEqual(cluster(rewritten, 'backend').load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address, { address: '127.0.0.1', port_value: 4002 });
  assert.deepEqual(rewritten.static_resources.listeners[0].address.socket_address, { address: '127.0.0.1', port_value: 0 });
  assert.throws(() => rewriteEnvoyConfig(shipped, { oauth2_extproc: '127.0.0.1:4001' }), /no test address for cluster "backend"/);
  assert.throws(() => rewriteEnvoyConfig(shipped, { oauth2_extproc: { pipe: '/tmp/x.sock' }, backend: '127.0.0.1:1' }), /not a Unix socket cluster/);
});
