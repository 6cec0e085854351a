// What the end-to-end tests share: an OAuth2 server, a backend, the sidecar and the real Envoy
// started for a suite (file or describe) and torn down after it, and the checks of what the
// backend received.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type RequestListener } from 'node:http';
import { createServer as createTcpServer, type AddressInfo } from 'node:net';
import { startOAuthServer, type OAuthServer, type OAuthServerOptions } from './oauth-server.ts';
import { profileFor, type SidecarProcess } from './sidecar.ts';
import { headerValues, startEchoBackend, type EchoBackend, type ReceivedRequest } from './echo-backend.ts';
import { send, startEnvoy, type ClusterTarget, type EnvoyProcess, type StartEnvoyOptions } from './envoy.ts';

/** The subscription key callers send, and the Authorization they forge. */
export const KEY = 'caller-subscription-key-5f2c9a';
export const FORGED = 'Bearer forged.by.the-caller';

/** A 127.0.0.1 port with nothing listening on it (bound, then released). */
export async function freePort(): Promise<number> {
  const server = createTcpServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** The one Bearer token the backend received (fails on none, several, or another scheme). */
export function bearer(received: ReceivedRequest): string {
  const values = headerValues(received, 'authorization');
  assert.equal(values.length, 1, `one authorization header: ${JSON.stringify(values)}`);
  const m = /^Bearer (\S+)$/.exec(values[0]!);
  assert.ok(m, 'Bearer <token>');
  return m[1]!;
}

/** No subscription-key header, and the key's value nowhere in the request (URL included). */
export function assertNoKey(received: ReceivedRequest, key = KEY): void {
  assert.deepEqual(headerValues(received, 'ocp-apim-subscription-key'), []);
  assert.ok(!JSON.stringify(received).includes(key), JSON.stringify(received));
}

/**
 * The sidecar's two profiles most tests run: `default` (the `post` client) and `reports`, another
 * client (client_secret_basic) for another resource, so another sub and aud.
 */
export function defaultAndReports(idp: OAuthServer): Record<string, any> {
  return {
    default: profileFor(idp),
    reports: profileFor(idp, {
      clientId: idp.clients.basic.clientId,
      clientSecret: idp.clients.basic.clientSecret,
      clientAuth: 'client_secret_basic',
      resource: 'https://reports.test',
    }),
  };
}

/** A backend made of a node:http handler, for tests that answer other than the echo backend. */
export interface HttpBackend {
  /** `127.0.0.1:PORT`. */
  address: string;
  close(): Promise<void>;
}

export async function startHttpBackend(handler: RequestListener): Promise<HttpBackend> {
  const server = createServer(handler);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    address: `127.0.0.1:${(server.address() as AddressInfo).port}`,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Envoy's clusters when no sidecar runs: oauth2_extproc at a port nothing listens on. */
export async function clustersWithoutSidecar({ backend }: { backend: Backend }): Promise<Record<string, ClusterTarget>> {
  return { oauth2_extproc: `127.0.0.1:${await freePort()}`, backend: backend.address };
}

interface Backend {
  address: string;
  close(): Promise<void>;
}

/** The parts of a running stack; reading one the stack does not run throws. */
export interface Stack<B extends Backend = EchoBackend> {
  idp: OAuthServer;
  backend: B;
  /** Settable: a test that restarts the sidecar puts the new one here, and it is stopped after. */
  sidecar: SidecarProcess;
  envoy: EnvoyProcess;
  /**
   * Sends one request through Envoy; asserts a 200 and that exactly one request reached the
   * backend, and returns what the backend received with the reply.
   */
  exchange(path: string, headers?: string[], init?: { method?: string; body?: string }): Promise<{ received: ReceivedRequest; status: number; body: string }>;
  /** `exchange()`, returning only what the backend received. */
  through(path: string, headers?: string[]): Promise<ReceivedRequest>;
}

export interface StackOptions<B extends Backend> {
  /** A reason to skip: the hooks then start nothing (for hooks at a file's top level). */
  skip?: string | false;
  /** The OAuth2 server's options, or false for none. Default: one with its defaults. */
  idp?: OAuthServerOptions | false;
  /** Starts the backend; by default an echo backend that keeps every request. */
  backend?: () => Promise<B>;
  /** Starts the sidecar (after the IdP and the backend); absent: no sidecar runs. */
  sidecar?: (stack: Stack<NoInfer<B>>) => Promise<SidecarProcess>;
  /** The shipped config Envoy runs, and where its clusters go (by default the sidecar's gRPC address and the backend). */
  envoy: Omit<StartEnvoyOptions, 'clusters'> & { clusters?: (stack: Stack<NoInfer<B>>) => Record<string, ClusterTarget> | Promise<Record<string, ClusterTarget>> };
  /** How the sidecar is stopped after the suite (SIGTERM by default). */
  sidecarStopSignal?: NodeJS.Signals;
}

/**
 * Registers a before() hook that starts the IdP, the backend, the sidecar and Envoy in that
 * order, and an after() hook that stops whatever of them started, in reverse. Call it in a
 * describe() for that suite, or at a file's top level for the file. The returned stack is
 * filled in by the before() hook.
 */
export function useStack<B extends Backend = EchoBackend>(options: StackOptions<B>): Stack<B> {
  const parts: { idp?: OAuthServer; backend?: B; sidecar?: SidecarProcess; envoy?: EnvoyProcess } = {};
  const part = <K extends keyof typeof parts>(name: K): NonNullable<(typeof parts)[K]> => {
    const value = parts[name];
    if (value === undefined) throw new Error(`this stack runs no ${name}`);
    return value!;
  };
  const stack: Stack<B> = {
    get idp() { return part('idp'); },
    get backend() { return part('backend'); },
    get sidecar() { return part('sidecar'); },
    set sidecar(value) { parts.sidecar = value; },
    get envoy() { return part('envoy'); },
    async exchange(path, headers = [], init = {}) {
      const backend = stack.backend as unknown as EchoBackend;
      const before = backend.tally.total;
      const reply = await send(`${stack.envoy.url}${path}`, { ...init, headers });
      assert.equal(reply.status, 200, reply.body);
      assert.equal(backend.tally.total, before + 1, 'exactly one request reached the backend');
      return { received: backend.requests.at(-1)!, status: reply.status, body: reply.body };
    },
    async through(path, headers = []) {
      return (await stack.exchange(path, headers)).received;
    },
  };

  before(async () => {
    if (options.skip) return;
    if (options.idp !== false) parts.idp = await startOAuthServer(options.idp);
    parts.backend = options.backend ? await options.backend() : await startEchoBackend() as unknown as B;
    if (options.sidecar) parts.sidecar = await options.sidecar(stack);
    const { clusters, ...envoy } = options.envoy;
    parts.envoy = await startEnvoy({
      ...envoy,
      clusters: clusters ? await clusters(stack) : { oauth2_extproc: stack.sidecar.grpcAddress, backend: stack.backend.address },
    });
  });

  after(async () => {
    await parts.envoy?.stop();
    await parts.sidecar?.stop(options.sidecarStopSignal);
    await parts.backend?.close();
    await parts.idp?.close();
  });

  return stack;
}
