// `npm run demo`: the whole path on one machine, in a few seconds. It starts a local OAuth2
// server (oidc-provider, client credentials, signed JWTs), an echo backend, the sidecar (the
// real CLI, as a child process) and Envoy with envoy/envoy.yaml, sends one request carrying a
// subscription key and a forged Authorization, and prints what the backend received. Without
// Envoy it says how to get it and shows the sidecar's answer to the message Envoy would send.
// Everything listens on 127.0.0.1 and is stopped before the demo exits. The token is never
// printed whole.
import { startOAuthServer, type OAuthServer } from '../test/helpers/oauth-server.ts';
import { profileFor, startSidecar, type SidecarProcess } from '../test/helpers/sidecar.ts';
import { headerValues, startEchoBackend, type EchoBackend } from '../test/helpers/echo-backend.ts';
import { ENVOY_MISSING, envoyVersion, findEnvoy, send, startEnvoy, type EnvoyProcess } from '../test/helpers/envoy.ts';
import { ExtProcClient, requestHeaders, setHeaders } from '../test/helpers/extproc-client.ts';

const KEY = '9f86d081884c7d659a2feaa0c55ad015';
const FORGED = 'Bearer forged-by-the-caller';
const PATH = '/orders/42';

const tty = process.stdout.isTTY === true;
const bold = (s: string): string => (tty ? `\x1b[1m${s}\x1b[0m` : s);
const dim = (s: string): string => (tty ? `\x1b[2m${s}\x1b[0m` : s);
const green = (s: string): string => (tty ? `\x1b[32m${s}\x1b[0m` : s);
const say = (s = ''): void => void process.stdout.write(`${s}\n`);

/** The start and length of a token: enough to recognise it, never enough to use it. */
function truncated(token: string): string {
  return `${token.slice(0, 24)}… (${token.length} characters, not shown in full)`;
}

function describeJwt(token: string): string[] {
  const [header, payload] = token.split('.');
  const decode = (part: string | undefined): Record<string, unknown> => JSON.parse(Buffer.from(part ?? '', 'base64url').toString('utf8')) as Record<string, unknown>;
  const claims = decode(payload);
  const lines = [`header: ${JSON.stringify(decode(header))}`, 'claims:'];
  for (const [k, v] of Object.entries(claims)) {
    const when = (k === 'exp' || k === 'iat') && typeof v === 'number' ? dim(`  (${new Date(v * 1000).toISOString()})`) : '';
    lines.push(`  ${k}: ${JSON.stringify(v)}${when}`);
  }
  return lines;
}

const cleanups: Array<() => Promise<unknown> | unknown> = [];
async function cleanup(): Promise<void> {
  for (const fn of cleanups.reverse()) await Promise.resolve(fn()).catch(() => undefined);
  cleanups.length = 0;
}
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => void cleanup().then(() => process.exit(130)));
}

async function quietly<T>(fn: () => Promise<T>): Promise<T> {
  // oidc-provider warns that its in-memory store is for development only: true, and expected here.
  const warn = console.warn;
  console.warn = (...args: unknown[]) => {
    if (!String(args[0]).includes('oidc-provider WARNING')) warn(...args);
  };
  try {
    return await fn();
  } finally {
    console.warn = warn;
  }
}

async function main(): Promise<void> {
  say(bold('oauth2-extproc demo') + dim(' — everything on 127.0.0.1, stopped when the demo ends'));
  say();

  const idp: OAuthServer = await quietly(() => startOAuthServer());
  cleanups.push(() => idp.close());
  say(`  OAuth2 server    ${idp.tokenUrl}  ${dim('(oidc-provider: client credentials, RS256 JWTs)')}`);

  const backend: EchoBackend = await startEchoBackend();
  cleanups.push(() => backend.close());
  say(`  echo backend     ${backend.url}  ${dim('(answers with the headers it received)')}`);

  const sidecar: SidecarProcess = await startSidecar({ config: { profiles: { default: profileFor(idp) } } });
  cleanups.push(() => sidecar.stop());
  const fetched = sidecar.logs().find((r) => r.msg === 'token fetched');
  say(`  oauth2-extproc   ext_proc ${sidecar.grpcAddress}, admin ${sidecar.adminUrl}  ${dim(`(token fetched in ${fetched?.durationMs ?? '?'} ms, expires in ${fetched?.expiresInSeconds ?? '?'} s)`)}`);

  const bin = findEnvoy();
  let envoy: EnvoyProcess | undefined;
  if (bin !== undefined) {
    envoy = await startEnvoy({ config: 'envoy.yaml', clusters: { oauth2_extproc: sidecar.grpcAddress, backend: backend.address }, bin });
    cleanups.push(() => envoy!.stop());
    say(`  Envoy ${envoyVersion(bin).padEnd(10)} ${envoy.url}  ${dim('(envoy/envoy.yaml, addresses rewritten to these ports)')}`);
  }
  say();

  say(bold('→ the caller sends'));
  say(`  GET ${PATH}`);
  say(`  Ocp-Apim-Subscription-Key: ${KEY}`);
  say(`  Authorization: ${FORGED}`);
  say();

  let token: string;
  if (envoy !== undefined) {
    const reply = await send(`${envoy.url}${PATH}`, { headers: ['Ocp-Apim-Subscription-Key', KEY, 'Authorization', FORGED, 'user-agent', 'oauth2-extproc-demo'] });
    if (reply.status !== 200) throw new Error(`Envoy answered ${reply.status}: ${reply.body}`);
    const received = backend.requests.at(-1)!;
    say(bold(`← Envoy answered ${reply.status}; the backend received`));
    say(`  GET ${received.url}`);
    const auth = headerValues(received, 'authorization');
    token = auth[0]!.replace(/^Bearer /, '');
    for (let i = 0; i < received.rawHeaders.length; i += 2) {
      const name = received.rawHeaders[i]!;
      const value = name.toLowerCase() === 'authorization' ? `Bearer ${truncated(token)}` : received.rawHeaders[i + 1]!;
      say(`  ${name}: ${value}`);
    }
    say();
    const key = headerValues(received, 'ocp-apim-subscription-key');
    say(`  ${key.length === 0 ? green('✓') : '✗'} ocp-apim-subscription-key: ${key.length === 0 ? 'not received (removed by the sidecar)' : 'RECEIVED'}`);
    say(`  ${auth.length === 1 && !auth[0]!.includes('forged') ? green('✓') : '✗'} authorization: the forged value was replaced by a token from the OAuth2 server`);
  } else {
    say(`${bold('Envoy is not installed,')} so the request cannot go through a proxy here.`);
    say(`  ${ENVOY_MISSING}`);
    say('  Instead, this is the sidecar answering the request_headers message Envoy would send for it');
    say(dim('  (a gRPC client built from the upstream Envoy protos, as Envoy opens one stream per request):'));
    say();
    const client = new ExtProcClient(sidecar.grpcAddress);
    cleanups.push(() => client.close());
    const { reply } = await client.exchange(requestHeaders([
      [':method', 'GET'], [':path', PATH], [':authority', 'orders.example.com'], [':scheme', 'http'],
      ['ocp-apim-subscription-key', KEY], ['authorization', FORGED],
    ]));
    const mutation = reply.request_headers?.response?.header_mutation ?? {};
    const set = setHeaders(reply);
    token = (set.authorization ?? '').replace(/^Bearer /, '');
    say(bold('← the sidecar tells Envoy'));
    say(`  set authorization: Bearer ${truncated(token)}  ${dim('(overwrites the forged one)')}`);
    say(`  remove: ${(mutation.remove_headers as string[] | undefined)?.join(', ') ?? '(nothing)'}`);
  }

  say();
  say(bold('The token the backend gets'));
  for (const line of describeJwt(token)) say(`  ${line}`);
  await idp.verify(token);
  say(`  ${green('✓')} signature verified with the OAuth2 server's published keys (JWKS)`);
  say();
  const metrics = await (await fetch(`${sidecar.adminUrl}/metrics`)).text();
  say(bold("The sidecar's metrics") + dim(` (${sidecar.adminUrl}/metrics)`));
  for (const line of metrics.split('\n').filter((l) => /^oauth2_extproc_(requests_total|token_fetches_total)\{/.test(l))) say(`  ${line}`);
  say();
  say(dim('Next: docs/deployment.md (Envoy, docker compose, Kubernetes), docs/troubleshooting.md.'));
}

try {
  await main();
  await cleanup();
} catch (err) {
  process.stderr.write(`demo failed: ${(err as Error).stack ?? String(err)}\n`);
  await cleanup();
  process.exitCode = 1;
}
