// envoy/envoy-uds.yaml, the config deploy/kubernetes/ runs: the sidecar on a Unix domain
// socket, through the real Envoy (only the socket path and the backend address rewritten).
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { profileFor, startSidecar } from '../helpers/sidecar.ts';
import { headerValues } from '../helpers/echo-backend.ts';
import { ENVOY_MISSING, findEnvoy, send } from '../helpers/envoy.ts';
import { useStack } from '../helpers/e2e-stack.ts';

const skip = findEnvoy() === undefined && !process.env.CI ? ENVOY_MISSING : false;

let dir: string;

const stack = useStack({
  skip,
  sidecar: ({ idp }) => {
    dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-uds-'));
    return startSidecar({
      config: {
        server: { grpc: `unix:${join(dir, 'extproc.sock')}` },
        profiles: {
          default: profileFor(idp),
          reports: profileFor(idp, { resource: 'https://reports.test' }),
        },
      },
    });
  },
  envoy: { config: 'envoy-uds.yaml', clusters: ({ backend }) => ({ oauth2_extproc: { pipe: join(dir, 'extproc.sock') }, backend: backend.address }) },
});

after(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test('the sidecar listens on the socket, readable and writable by its owner and group only', { skip }, () => {
  assert.equal(stack.sidecar.grpcAddress, `unix:${join(dir, 'extproc.sock')}`);
  const stat = statSync(join(dir, 'extproc.sock'));
  assert.ok(stat.isSocket());
  assert.equal(stat.mode & 0o777, 0o660);
});

test('through the socket: the token is injected, the key and a forged Authorization never arrive', { skip }, async () => {
  for (const [path, audience] of [['/orders/1', 'https://upstream.test'], ['/reports/monthly', 'https://reports.test']] as const) {
    const reply = await send(`${stack.envoy.url}${path}`, { headers: ['Ocp-Apim-Subscription-Key', 'k-123', 'Authorization', 'Bearer forged'] });
    assert.equal(reply.status, 200, reply.body);
    const received = stack.backend.requests.at(-1)!;
    assert.equal(received.url, path);
    assert.deepEqual(headerValues(received, 'ocp-apim-subscription-key'), []);
    const auth = headerValues(received, 'authorization');
    assert.equal(auth.length, 1);
    const claims = await stack.idp.verify(auth[0]!.replace(/^Bearer /, ''), audience);
    assert.equal(claims.aud, audience);
  }
  assert.equal(stack.backend.tally.total, 2);
});
