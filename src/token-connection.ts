// The connection to a token endpoint: which CAs are trusted (the system's plus a profile's
// `tls.ca`), which client certificate is presented (tls_client_auth), and whether it goes
// through the HTTPS_PROXY / HTTP_PROXY / NO_PROXY proxy. PEMs are handed in at every fetch; a
// changed one gets a new dispatcher, so a rotated certificate is used without a restart.
import { createHash } from 'node:crypto';
import * as tls from 'node:tls';
import { Agent, EnvHttpProxyAgent, type Dispatcher } from 'undici';
import type { ProxyConfig } from './config.ts';

// Token fetches are minutes apart, but a start with several profiles or a run of retries
// reuses the connection. Never the global dispatcher: tests and callers inject their own.
const KEEP_ALIVE = { keepAliveTimeout: 30_000, keepAliveMaxTimeout: 120_000 } as const;
const sharedAgent = new Agent(KEEP_ALIVE);

export interface ConnectionNeeds {
  /** PEM of the CAs trusted in addition to the system's. */
  ca?: string | undefined;
  /** PEM client certificate and key (RFC 8705 §2). */
  client?: { cert: string; key: string } | undefined;
  /** Never through a proxy (host-local identity endpoints). */
  direct?: boolean;
}

export class TokenConnection {
  readonly #fallback: Dispatcher;
  readonly #proxy: ProxyConfig | undefined;
  #built: { fingerprint: string; dispatcher: Dispatcher } | undefined;

  /** `fallback`: the dispatcher used when nothing special is needed (the shared keep-alive Agent by default). */
  constructor(proxy: ProxyConfig | undefined, fallback?: Dispatcher) {
    this.#proxy = proxy;
    this.#fallback = fallback ?? sharedAgent;
  }

  dispatcher(needs: ConnectionNeeds): Dispatcher {
    const proxied = this.#proxy !== undefined && needs.direct !== true;
    if (needs.ca === undefined && needs.client === undefined && !proxied) return this.#fallback;
    // A digest, not the PEMs: the key stays out of any long-lived string we hold.
    const fingerprint = createHash('sha256')
      .update(JSON.stringify([needs.ca ?? '', needs.client?.cert ?? '', needs.client?.key ?? '', proxied]))
      .digest('base64');
    if (this.#built?.fingerprint === fingerprint) return this.#built.dispatcher;

    const connect: tls.ConnectionOptions = {};
    // `ca` replaces Node's default list, so the defaults go in first: "in addition to".
    if (needs.ca !== undefined) connect.ca = [...defaultCAs(), needs.ca];
    if (needs.client !== undefined) {
      connect.cert = needs.client.cert;
      connect.key = needs.client.key;
    }
    const dispatcher: Dispatcher = proxied
      ? new EnvHttpProxyAgent({
        ...KEEP_ALIVE,
        // Empty strings, never undefined: undici would then read process.env itself, and only
        // config.ts reads the environment.
        httpProxy: this.#proxy!.httpProxy ?? '',
        httpsProxy: this.#proxy!.httpsProxy ?? '',
        noProxy: this.#proxy!.noProxy ?? '',
        connect,
        // Through a CONNECT tunnel the origin's TLS is set up with these.
        requestTls: connect,
        // Plain http goes in absolute form, as curl sends it (proxies often refuse CONNECT to
        // port 80); https is always a CONNECT tunnel.
        proxyTunnel: false,
      } as EnvHttpProxyAgent.Options)
      : new Agent({ ...KEEP_ALIVE, connect });
    const old = this.#built?.dispatcher;
    this.#built = { fingerprint, dispatcher };
    // Requests still on the old one finish; it closes after them.
    if (old !== undefined) old.close().catch(() => undefined);
    return dispatcher;
  }

  async close(): Promise<void> {
    const built = this.#built;
    this.#built = undefined;
    if (built !== undefined) await built.dispatcher.close();
  }
}

function defaultCAs(): readonly string[] {
  // Node's default store (bundled, NODE_EXTRA_CA_CERTS, --use-system-ca) where Node can say it.
  return typeof tls.getCACertificates === 'function' ? tls.getCACertificates('default') : tls.rootCertificates;
}
