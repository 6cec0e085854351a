// SIGTERM at the earliest moment a supervisor can see the sidecar up (its "listening" line),
// while the first token fetch still hangs: the sidecar drains and exits 0, it is not killed by
// the signal. The handlers are installed before the listeners bind (src/cli.ts).
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { startOAuthServer, type OAuthServer } from './helpers/oauth-server.ts';
import { profileFor, startSidecar } from './helpers/sidecar.ts';

let idp: OAuthServer;

before(async () => {
  idp = await startOAuthServer();
});

after(async () => {
  await idp?.close();
});

test('SIGTERM right after "listening", with the first token fetch in flight: drained, exit 0', async () => {
  idp.override('hang');
  const sidecar = await startSidecar({ config: { profiles: { default: profileFor(idp) } }, waitReady: false });
  const code = await sidecar.stop('SIGTERM');
  assert.equal(sidecar.child.signalCode, null, 'the process handled the signal itself');
  assert.equal(code, 0, sidecar.stderr.join(''));
  assert.ok(sidecar.logs().some((l) => l.msg === 'stopped'), sidecar.stdout.join('\n'));
});
