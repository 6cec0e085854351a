// `npm run demo` end to end: exits 0, shows the token injected and the key removed, and never
// prints a whole token; with Envoy, and without it (the sidecar's answer instead).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { ENVOY_MISSING, findEnvoy } from '../helpers/envoy.ts';

const DEMO = fileURLToPath(new URL('../../scripts/demo.ts', import.meta.url));
const JWT = /eyJ[\w-]+\.[\w-]+\.[\w-]+/;

function demo(env: NodeJS.ProcessEnv = {}): Promise<{ code: number | null; out: string }> {
  const child = spawn(process.execPath, [DEMO], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (c: Buffer) => (out += c.toString()));
  child.stderr.on('data', (c: Buffer) => (out += c.toString()));
  return new Promise((resolve) => child.on('close', (code) => resolve({ code, out })));
}

test('the demo sends a request through Envoy and shows what the backend received', { skip: findEnvoy() === undefined && !process.env.CI ? ENVOY_MISSING : false }, async () => {
  const { code, out } = await demo();
  assert.equal(code, 0, out);
  assert.match(out, /← Envoy answered 200; the backend received/);
  assert.match(out, /✓ ocp-apim-subscription-key: not received/);
  assert.match(out, /✓ authorization: the forged value was replaced/);
  assert.match(out, /sub: "orders-post"/);
  assert.match(out, /✓ signature verified/);
  assert.doesNotMatch(out, JWT, 'no whole token printed');
});

test('without Envoy the demo says how to get it and shows the sidecar answer', async () => {
  const { code, out } = await demo({ ENVOY_BIN: '/nonexistent/envoy' });
  assert.equal(code, 0, out);
  assert.ok(out.includes(ENVOY_MISSING), out);
  assert.match(out, /← the sidecar tells Envoy\n {2}set authorization: Bearer eyJ[\w-]{21}… \(\d+ characters, not shown in full\)/);
  assert.match(out, /remove: ocp-apim-subscription-key/);
  assert.doesNotMatch(out, JWT, 'no whole token printed');
});
