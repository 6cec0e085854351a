// The shipped Envoy configs: accepted by the real Envoy (`--mode validate`), consistent with
// each other, and set up the way the sidecar needs (fail closed, request headers only, …).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createServer, request as httpRequest, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { ENVOY_DIR, ENVOY_MISSING, eventually, findEnvoy, loadShippedConfig, maskAddresses, rewriteEnvoyConfig, send, startEnvoy } from '../helpers/envoy.ts';
import { startOAuthServer } from '../helpers/oauth-server.ts';
import { profileFor, startSidecar } from '../helpers/sidecar.ts';

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

// --- Edge hardening (Envoy's "Configuring Envoy as an edge proxy"): what the path, header and
// resource settings must be, in both full configs, each with a comment saying why. ---

function hcm(doc: any): any {
  return doc.static_resources.listeners[0].filter_chains[0].filters[0].typed_config;
}

/** `key:` lines of the YAML text without a `#` comment line at their own indentation within the three lines above. */
function uncommented(text: string, keys: string[]): string[] {
  const lines = text.split('\n');
  const out: string[] = [];
  lines.forEach((line, i) => {
    const m = /^(\s*)(?:- )?([a-z_]+):/.exec(line);
    if (!m || !keys.includes(m[2]!)) return;
    const above = lines.slice(Math.max(0, i - 3), i);
    if (!above.some((l) => l.startsWith(`${m[1]}#`) || l.startsWith(`${m[1]}  #`))) out.push(`line ${i + 1}: ${line.trim()}`);
  });
  return out;
}

const HARDENING_KEYS = [
  'use_remote_address', 'normalize_path', 'merge_slashes', 'path_with_escaped_slashes_action', 'max_request_headers_kb',
  'request_headers_timeout', 'stream_idle_timeout', 'headers_with_underscores_action', 'max_headers_count', 'idle_timeout',
  'max_concurrent_streams', 'initial_stream_window_size', 'per_connection_buffer_limit_bytes', 'circuit_breakers',
  'max_active_downstream_connections', 'max_heap_size_bytes',
];

for (const file of SHIPPED) {
  test(`${file}: header names with _ refused, paths normalised, escaped slashes refused (what the promise rests on)`, () => {
    const h = hcm(loadShippedConfig(file));
    assert.equal(h.common_http_protocol_options?.headers_with_underscores_action, 'REJECT_REQUEST');
    assert.equal(h.normalize_path, true);
    assert.equal(h.merge_slashes, true);
    assert.ok(['REJECT_REQUEST', 'UNESCAPE_AND_REDIRECT'].includes(h.path_with_escaped_slashes_action), h.path_with_escaped_slashes_action);
  });
}

for (const file of ['envoy.yaml', 'envoy-uds.yaml']) {
  test(`${file}: edge hardening of the listener (paths, header names, header and buffer limits, timeouts)`, () => {
    const doc = loadShippedConfig(file);
    const h = hcm(doc);
    // Routing (and so the profile) happens on the path the backend receives.
    assert.equal(h.normalize_path, true);
    assert.equal(h.merge_slashes, true);
    assert.ok(['REJECT_REQUEST', 'UNESCAPE_AND_REDIRECT'].includes(h.path_with_escaped_slashes_action), h.path_with_escaped_slashes_action);
    assert.equal(h.common_http_protocol_options.headers_with_underscores_action, 'REJECT_REQUEST');
    assert.equal(h.use_remote_address, true);
    // Header limits at most Envoy's defaults: the sidecar's token size limit is derived from them.
    assert.ok(h.max_request_headers_kb > 0 && h.max_request_headers_kb <= 60, String(h.max_request_headers_kb));
    assert.ok(h.common_http_protocol_options.max_headers_count <= 100);
    for (const timeout of ['request_headers_timeout', 'stream_idle_timeout']) assert.match(h[timeout], /^[1-9]\d*s$/, timeout);
    assert.match(h.common_http_protocol_options.idle_timeout, /^[1-9]\d*s$/);
    assert.deepEqual(h.http2_protocol_options, { max_concurrent_streams: 100, initial_stream_window_size: 65536, initial_connection_window_size: 1048576 });
    assert.equal(doc.static_resources.listeners[0].per_connection_buffer_limit_bytes, 32768);
    const monitors = Object.fromEntries(doc.overload_manager.resource_monitors.map((m: any) => [m.name, m.typed_config]));
    assert.ok(monitors['envoy.resource_monitors.global_downstream_max_connections'].max_active_downstream_connections > 0);
    assert.ok(monitors['envoy.resource_monitors.fixed_heap'].max_heap_size_bytes <= 256 * 1024 * 1024, 'under the Kubernetes manifest limit');
    assert.deepEqual(doc.overload_manager.actions.map((a: any) => a.name), ['envoy.overload_actions.shrink_heap', 'envoy.overload_actions.stop_accepting_requests']);
  });

  test(`${file}: every cluster has its own circuit breakers and header limits, sized against each other`, () => {
    const doc = loadShippedConfig(file);
    const connections = doc.overload_manager.resource_monitors
      .find((m: any) => m.name === 'envoy.resource_monitors.global_downstream_max_connections').typed_config.max_active_downstream_connections;
    for (const c of doc.static_resources.clusters) {
      const thresholds = c.circuit_breakers?.thresholds;
      assert.ok(Array.isArray(thresholds) && thresholds.length > 0, `${c.name}: circuit breakers`);
      const options = c.typed_extension_protocol_options['envoy.extensions.upstreams.http.v3.HttpProtocolOptions'].common_http_protocol_options;
      assert.ok(options.max_headers_count <= 100 && options.max_response_headers_kb <= 60, `${c.name}: header limits`);
    }
    const backend = cluster(doc, 'backend');
    const extproc = cluster(doc, 'oauth2_extproc');
    assert.equal(backend.per_connection_buffer_limit_bytes, 32768);
    const backendDefault = backend.circuit_breakers.thresholds.find((t: any) => t.priority === 'DEFAULT');
    // Not Envoy's 1,024: the breaker trips only once as many requests are held as Envoy takes connections…
    assert.ok(backendDefault.max_connections >= connections && backendDefault.max_requests >= connections && backendDefault.max_pending_requests >= 1024);
    // …and every one of them can still hold an ext_proc stream.
    for (const t of extproc.circuit_breakers.thresholds) assert.ok(t.max_requests >= backendDefault.max_requests);
  });

  test(`${file}: each hardening setting carries a comment saying why`, () => {
    assert.deepEqual(uncommented(readFileSync(join(ENVOY_DIR, file), 'utf8'), HARDENING_KEYS), []);
  });
}

test('the comment check can fail', () => {
  assert.deepEqual(uncommented('a:\n  # why\n  normalize_path: true\n  merge_slashes: true\n\n\n\n  idle_timeout: 1s\n', ['normalize_path', 'idle_timeout']), ['line 8: idle_timeout: 1s']);
});

// Envoy's default breakers on the backend (1,024 connections + 1,024 pending) let one caller who
// holds ~2,000 slow requests make Envoy answer every other caller 503. Through the shipped file:
// 2,100 held requests, and an ordinary one is still served.
test('envoy.yaml: 2,100 slow requests held at the backend do not make Envoy refuse another caller', { skip }, async () => {
  const HELD = 2100;
  const held: ServerResponse[] = [];
  const backend = createServer((req, res) => {
    if (req.url?.startsWith('/slow/')) held.push(res);
    else res.end('ok');
  });
  backend.keepAliveTimeout = 60_000;
  await new Promise<void>((resolve) => backend.listen(0, '127.0.0.1', 4096, resolve));
  const idp = await startOAuthServer();
  const sidecar = await startSidecar({ config: { profiles: { default: profileFor(idp) } } });
  const proxy = await startEnvoy({ config: 'envoy.yaml', clusters: { oauth2_extproc: sidecar.grpcAddress, backend: `127.0.0.1:${(backend.address() as AddressInfo).port}` } });
  const { port } = new URL(proxy.url);
  try {
    let early = 0;
    const answered = new Map<number, number>();
    const hold = (i: number) => new Promise<number>((resolve) => {
      // One connection each, as HTTP/1.1 clients holding a request do.
      const req = httpRequest({ host: '127.0.0.1', port, path: `/slow/${i}`, agent: false }, (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      });
      req.on('error', () => resolve(0));
      req.end();
    }).then((status) => {
      early++;
      answered.set(status, (answered.get(status) ?? 0) + 1);
      return status;
    });
    const slow: Array<Promise<number>> = [];
    // In steps of 100 (a burst of 2,100 new streams at once is another test: here the sidecar
    // must not be the bottleneck), each placed before the next: at the backend, queued in
    // Envoy, or already answered.
    while (slow.length < HELD) {
      for (let i = 0; i < 100; i++) slow.push(hold(slow.length));
      await eventually(`${slow.length} slow requests placed`, async () => {
        const pending = (await proxy.stats('cluster\\.backend\\.upstream_rq_pending_active$'))['cluster.backend.upstream_rq_pending_active'] ?? 0;
        return held.length + pending + early >= slow.length ? true : undefined;
      }, 10_000);
    }
    const probe = await send(`${proxy.url}/orders/1`);
    const stats = await proxy.stats('cluster\\.backend\\.upstream_(rq_pending_overflow|cx_overflow)$');
    assert.equal(probe.status, 200, `${probe.status} ${probe.body} with ${held.length} held at the backend, ${early} answered early; ${JSON.stringify(stats)}`);
    await eventually('every slow request at the backend', () => (held.length === HELD ? true : undefined), 10_000)
      .catch(async (err: Error) => assert.fail(`${err.message}: ${held.length} held, answered ${JSON.stringify([...answered])}; ${JSON.stringify(await proxy.stats('(ext_proc|overflow|_5xx|downstream_rq_5xx)'))}`));
    assert.equal(stats['cluster.backend.upstream_rq_pending_overflow'] ?? 0, 0);
    for (const res of held) res.end('late');
    const statuses = await Promise.all(slow);
    // 200 once released (504 only if this machine took longer than the route's 15 s timeout to
    // place them all); never a 503 overflow.
    assert.deepEqual(statuses.filter((s) => s !== 200 && s !== 504), []);
  } finally {
    for (const res of held) if (!res.writableEnded) res.end();
    await proxy.stop();
    await sidecar.stop();
    await idp.close();
    backend.closeAllConnections();
    await new Promise<void>((resolve) => backend.close(() => resolve()));
  }
});
