// A request that lasts longer than the sidecar's stream idle limit (a streamed response, as
// server-sent events or a large download) keeps working through the shipped envoy/envoy.yaml:
// the idle limit applies to ext_proc streams, and Envoy 1.40 closes a request's stream as soon
// as it has its answer, not when the HTTP response ends.
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, test } from 'node:test';
import { ENVOY_MISSING, findEnvoy, startEnvoy, type EnvoyProcess } from '../helpers/envoy.ts';
import { startOAuthServer, type OAuthServer } from '../helpers/oauth-server.ts';
import { profileFor, startSidecar, type SidecarProcess } from '../helpers/sidecar.ts';

const skip = findEnvoy() === undefined && !process.env.CI ? ENVOY_MISSING : false;
const IDLE_SECONDS = 1;
const CHUNKS = 8;
const CHUNK_EVERY_MS = 500; // 8 x 0.5 s = 4 s: four times the idle limit

let idp: OAuthServer;
let backend: Server;
let sidecar: SidecarProcess;
let envoy: EnvoyProcess;
const seenAuthorization: string[] = [];

before(async () => {
  if (skip) return;
  idp = await startOAuthServer();
  backend = createServer((req, res) => {
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
  });
  await new Promise<void>((resolve) => backend.listen(0, '127.0.0.1', resolve));
  sidecar = await startSidecar({ config: { server: { streamIdleSeconds: IDLE_SECONDS }, profiles: { default: profileFor(idp) } } });
  envoy = await startEnvoy({
    config: 'envoy.yaml',
    clusters: { oauth2_extproc: sidecar.grpcAddress, backend: `127.0.0.1:${(backend.address() as AddressInfo).port}` },
  });
});

after(async () => {
  await envoy?.stop();
  await sidecar?.stop();
  backend?.closeAllConnections();
  await new Promise<void>((resolve) => (backend ? backend.close(() => resolve()) : resolve()));
  await idp?.close();
});

test(`a response streamed for ${(CHUNKS * CHUNK_EVERY_MS) / 1000} s, past the ${IDLE_SECONDS} s stream idle limit, arrives whole`, { skip }, async () => {
  const res = await fetch(`${envoy.url}/events`, { headers: { 'ocp-apim-subscription-key': 'caller-key' } });
  assert.equal(res.status, 200);
  const body = await res.text();
  assert.deepEqual(body.trim().split('\n'), Array.from({ length: CHUNKS }, (_, i) => `chunk ${i}`));
  assert.equal(seenAuthorization.length, 1);
  assert.match(seenAuthorization[0]!, /^Bearer ey/);
  const stats = await envoy.stats('ext_proc\\.streams_failed');
  assert.equal(stats['http.ingress.ext_proc.streams_failed'] ?? 0, 0);
});
