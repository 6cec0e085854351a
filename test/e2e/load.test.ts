// Sustained load through the real Envoy: thousands of requests over keep-alive connections for
// about fifteen seconds per config, with zero failures. Run with the shipped envoy.yaml and with
// envoy-minimal.yaml, whose connection settings are Envoy's defaults: there every ext_proc
// stream ends with a reset on long-lived HTTP/2 connections, which is where Node's HTTP/2
// "rapid reset" limiter (GOAWAY after ~1,000 resets per connection) would fail requests.
// Bounded in time and count, loopback only, no timing assertions.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { Pool } from 'undici';
import { profileFor, startSidecar } from '../helpers/sidecar.ts';
import { startEchoBackend } from '../helpers/echo-backend.ts';
import { ENVOY_MISSING, findEnvoy } from '../helpers/envoy.ts';
import { useStack } from '../helpers/e2e-stack.ts';

const skip = findEnvoy() === undefined && !process.env.CI ? ENVOY_MISSING : false;
const DURATION_MS = 20_000;
const MAX_REQUESTS = 250_000;
const CONNECTIONS = 16; // client keep-alive connections to Envoy
const IN_FLIGHT = 32; // requests outstanding at any time

interface LoadResult {
  sent: number;
  statuses: Map<number, number>;
  errors: Map<string, number>;
  seconds: number;
}

async function load(url: string): Promise<LoadResult> {
  const pool = new Pool(url, { connections: CONNECTIONS, pipelining: 1, keepAliveTimeout: 30_000 });
  const statuses = new Map<number, number>();
  const errors = new Map<string, number>();
  let sent = 0;
  const started = Date.now();
  const deadline = started + DURATION_MS;
  const worker = async (): Promise<void> => {
    while (Date.now() < deadline && sent < MAX_REQUESTS) {
      sent++;
      try {
        const res = await pool.request({
          path: `/orders/${sent}`,
          method: 'GET',
          headers: { 'ocp-apim-subscription-key': 'load-test-key', authorization: 'Bearer forged' },
        });
        await res.body.dump();
        statuses.set(res.statusCode, (statuses.get(res.statusCode) ?? 0) + 1);
      } catch (err) {
        const key = (err as { code?: string }).code ?? (err as Error).message;
        errors.set(key, (errors.get(key) ?? 0) + 1);
      }
    }
  };
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  await pool.close();
  return { sent, statuses, errors, seconds: (Date.now() - started) / 1000 };
}

for (const config of ['envoy.yaml', 'envoy-minimal.yaml']) {
  describe(`sustained load through ${config}`, { skip }, () => {
    const stack = useStack({
      backend: () => startEchoBackend({ keep: 0 }),
      sidecar: ({ idp }) => startSidecar({ config: { profiles: { default: profileFor(idp) } } }),
      envoy: { config },
    });

    test('every request succeeds with the token injected and the key removed', async (t) => {
      const result = await load(stack.envoy.url);
      const stats = await stack.envoy.stats('(ext_proc\\.|cluster\\.oauth2_extproc\\.upstream_(cx_total|cx_destroy|rq_total|rq_pending_overflow|rq_rx_reset|rq_tx_reset))');
      const pick = (suffix: string): number => stats[Object.keys(stats).find((k) => k.endsWith(suffix)) ?? ''] ?? 0;
      t.diagnostic(`${config}: ${result.sent} requests in ${result.seconds.toFixed(1)} s (${Math.round(result.sent / result.seconds)}/s) over ${CONNECTIONS} connections, ${IN_FLIGHT} in flight; `
        + `statuses ${JSON.stringify(Object.fromEntries(result.statuses))}, errors ${JSON.stringify(Object.fromEntries(result.errors))}; `
        + `Envoy→sidecar: ${pick('upstream_cx_total')} connections, ${pick('ext_proc.streams_started')} streams, ${pick('ext_proc.streams_failed')} failed, `
        + `${pick('upstream_rq_tx_reset')} reset by Envoy, ${pick('upstream_rq_rx_reset')} reset by the sidecar, ${pick('upstream_cx_destroy_remote_with_active_rq')} connections closed by it with requests in flight`);

      assert.ok(result.sent >= 1000, `thousands of requests (${result.sent})`);
      assert.deepEqual(Object.fromEntries(result.errors), {});
      assert.deepEqual(Object.fromEntries(result.statuses), { 200: result.sent });
      // From the backend's side: every request arrived, each with a valid token, none with the key.
      assert.equal(stack.backend.tally.total, result.sent);
      assert.equal(stack.backend.tally.watched, 0, 'no request carried ocp-apim-subscription-key');
      assert.ok(!stack.backend.tally.authorization.has('Bearer forged') && !stack.backend.tally.authorization.has('<none>'));
      for (const value of stack.backend.tally.authorization.keys()) await stack.idp.verify(value.replace(/^Bearer /, ''));
      // Envoy's side of the ext_proc streams.
      assert.equal(pick('ext_proc.streams_started'), result.sent);
      for (const name of ['ext_proc.streams_failed', 'ext_proc.message_timeouts', 'ext_proc.spurious_msgs_received', 'ext_proc.failure_mode_allowed', 'upstream_cx_destroy_remote_with_active_rq', 'upstream_rq_pending_overflow']) {
        assert.equal(pick(name), 0, name);
      }
    });
  });
}
