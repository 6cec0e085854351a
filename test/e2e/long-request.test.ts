// A request that lasts longer than the sidecar's stream idle limit (a streamed response, as
// server-sent events or a large download) keeps working through the shipped envoy/envoy.yaml:
// the idle limit applies to ext_proc streams, and Envoy 1.40 closes a request's stream as soon
// as it has its answer, not when the HTTP response ends.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ENVOY_MISSING, findEnvoy } from '../helpers/envoy.ts';
import { startHttpBackend, useStack } from '../helpers/e2e-stack.ts';
import { profileFor, startSidecar } from '../helpers/sidecar.ts';

const skip = findEnvoy() === undefined && !process.env.CI ? ENVOY_MISSING : false;
const IDLE_SECONDS = 1;
const CHUNKS = 8;
const CHUNK_EVERY_MS = 500; // 8 x 0.5 s = 4 s: four times the idle limit

const seenAuthorization: string[] = [];

const stack = useStack({
  skip,
  backend: () => startHttpBackend((req, res) => {
    seenAuthorization.push(req.headers.authorization ?? '');
    res.writeHead(200, { 'content-type': 'text/plain' });
    let sent = 0;
    const timer = setInterval(() => {
      res.write(`chunk ${sent}\n`);
      if (++sent === CHUNKS) {
        clearInterval(timer);
        res.end();
      }
    }, CHUNK_EVERY_MS);
    res.on('close', () => clearInterval(timer));
  }),
  sidecar: ({ idp }) => startSidecar({ config: { server: { streamIdleSeconds: IDLE_SECONDS }, profiles: { default: profileFor(idp) } } }),
  envoy: { config: 'envoy.yaml' },
});

test(`a response streamed for ${(CHUNKS * CHUNK_EVERY_MS) / 1000} s, past the ${IDLE_SECONDS} s stream idle limit, arrives whole`, { skip }, async () => {
  const res = await fetch(`${stack.envoy.url}/events`, { headers: { 'ocp-apim-subscription-key': 'caller-key' } });
  assert.equal(res.status, 200);
  const body = await res.text();
  assert.deepEqual(body.trim().split('\n'), Array.from({ length: CHUNKS }, (_, i) => `chunk ${i}`));
  assert.equal(seenAuthorization.length, 1);
  assert.match(seenAuthorization[0]!, /^Bearer ey/);
  const stats = await stack.envoy.stats('ext_proc\\.streams_failed');
  assert.equal(stats['http.ingress.ext_proc.streams_failed'] ?? 0, 0);
});
