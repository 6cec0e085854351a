// SIGTERM under steady load through the real Envoy running the shipped envoy/envoy.yaml:
// readiness goes 503 at once, every request sent during the drain still gets its token, and the
// sidecar exits 0 by itself once the load has stopped (before its grace period is over).
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { DRAIN_QUIET_MS } from '../../src/grpc-listener.ts';
import { startEchoBackend, type EchoBackend } from '../helpers/echo-backend.ts';
import { ENVOY_MISSING, findEnvoy, startEnvoy, type EnvoyProcess } from '../helpers/envoy.ts';
import { startOAuthServer, type OAuthServer } from '../helpers/oauth-server.ts';
import { profileFor, startSidecar, type SidecarProcess } from '../helpers/sidecar.ts';

const skip = findEnvoy() === undefined && !process.env.CI ? ENVOY_MISSING : false;
const GRACE_SECONDS = 20;
const CLIENTS = 8;
/** How long the load goes on after SIGTERM: longer than the quiet period, so the drain must wait for it. */
const LOAD_AFTER_SIGTERM_MS = 3 * DRAIN_QUIET_MS;

let idp: OAuthServer;
let backend: EchoBackend;

before(async () => {
  if (skip) return;
  idp = await startOAuthServer();
  backend = await startEchoBackend({ keep: 0 });
});

after(async () => {
  await backend?.close();
  await idp?.close();
});

interface Outcome {
  status: number;
  bearer: boolean;
  phase: 'before' | 'draining';
}

/** CLIENTS loops of requests through Envoy until `stop()`; every outcome is kept. */
function steadyLoad(url: string): { outcomes: Outcome[]; phase: { now: Outcome['phase'] }; stop(): Promise<void> } {
  const outcomes: Outcome[] = [];
  const phase = { now: 'before' as Outcome['phase'] };
  let running = true;
  const loops = Array.from({ length: CLIENTS }, async () => {
    while (running) {
      const sentIn = phase.now;
      const res = await fetch(`${url}/orders/42`, { headers: { 'ocp-apim-subscription-key': 'caller-key' } });
      const body = await res.text();
      let bearer = false;
      try {
        bearer = /^Bearer ey/.test(JSON.parse(body).headers?.authorization ?? '');
      } catch {
        // Envoy's own 500 page: not JSON.
      }
      outcomes.push({ status: res.status, bearer, phase: sentIn });
    }
  });
  return {
    outcomes,
    phase,
    async stop() {
      running = false;
      await Promise.all(loops);
    },
  };
}

for (const workers of [1, 2]) {
  describe(`SIGTERM during steady load through Envoy (server.workers: ${workers})`, { skip }, () => {
    let sidecar: SidecarProcess;
    let envoy: EnvoyProcess;

    before(async () => {
      sidecar = await startSidecar({ config: { server: { workers, shutdownGraceSeconds: GRACE_SECONDS }, profiles: { default: profileFor(idp) } } });
      envoy = await startEnvoy({ config: 'envoy.yaml', clusters: { oauth2_extproc: sidecar.grpcAddress, backend: backend.address } });
    });

    after(async () => {
      await envoy?.stop();
      await sidecar?.stop('SIGKILL');
    });

    test('every request sent during the drain gets its token; readiness 503 at once; exit 0 once the load stops', async () => {
      const load = steadyLoad(envoy.url);
      while (load.outcomes.length < 200) await new Promise((resolve) => setTimeout(resolve, 20));
      const exitCode = sidecar.exited;
      load.phase.now = 'draining';
      sidecar.child.kill('SIGTERM');
      // As soon as the process has taken the signal (its first line about it), not before.
      await sidecar.waitForLog((l) => l.msg === 'shutting down');
      const readyz = await fetch(`${sidecar.adminUrl}/readyz`);
      assert.equal(readyz.status, 503, 'not ready as soon as the drain starts');
      await new Promise((resolve) => setTimeout(resolve, LOAD_AFTER_SIGTERM_MS));
      await load.stop();

      const during = load.outcomes.filter((o) => o.phase === 'draining');
      const failed = during.filter((o) => o.status !== 200 || !o.bearer);
      assert.ok(during.length > 100, `only ${during.length} requests during the drain`);
      assert.deepEqual(failed, [], `${failed.length} of ${during.length} requests sent during the drain failed`);

      assert.equal(await exitCode, 0);
      const logs = sidecar.logs();
      // It stopped because the streams did, not because the grace period ran out.
      assert.ok(logs.some((l) => l.msg === 'stopped'), 'logged "stopped"');
      assert.deepEqual(logs.filter((l) => /grace period over/.test(l.msg ?? '')), []);
      const stats = await envoy.stats('ext_proc\\.streams_failed');
      assert.equal(stats['http.ingress.ext_proc.streams_failed'] ?? 0, 0);
    });
  });
}
