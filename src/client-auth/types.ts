// The one interface every client-authentication method implements, and what a method hands the
// token source. Types only: the method files and index.ts both need them, without a cycle.
import type { ProfileConfig } from '../config-types.ts';

/** What one token fetch carries to prove the client's identity. Built fresh at every fetch. */
export interface Credentials {
  /** Form fields added to the client-credentials request (client_id, client_assertion, …). */
  form: Record<string, string>;
  /** Headers added to the request (Authorization: Basic …, Metadata: true, …). */
  headers: Record<string, string>;
  /** Client certificate and key (PEM) for the TLS connection (RFC 8705 §2). */
  tlsClient?: { cert: string; key: string };
  /**
   * The raw secret values this request carries; the response parser masks them (and their
   * encodings) in anything the endpoint echoes back.
   */
  secrets: string[];
  /** Facts `token` may print: assertion header and claims, thumbprints. Nothing secret. */
  details: Record<string, unknown>;
  /**
   * Set by a method that is not the client-credentials POST to `tokenUrl` (managed identity):
   * the endpoint asked instead, the statuses worth retrying within one fetch, and how its
   * answer differs from RFC 6749 §5.1.
   */
  exchange?: Exchange;
}

export interface Exchange {
  method: 'GET';
  url: string;
  /** Never through a proxy (IMDS and App Service identity endpoints are host-local). */
  direct: boolean;
  /** Statuses retried within one fetch, with these waits between attempts. */
  retryStatuses: (status: number) => boolean;
  retryDelaysMs: readonly number[];
  /** Rewrites a 2xx body into an RFC 6749 §5.1 token response before it is parsed. */
  adaptBody(text: string, now: number): string;
  /**
   * Azure Arc: answers a 401's `WWW-Authenticate` with the headers to repeat the request with
   * (once), and the secret values among them.
   */
  challenge?: (wwwAuthenticate: string) => { headers: Record<string, string>; secrets: string[] };
}

export interface ClientAuthMethod {
  /** Reads what it needs now (keys, certificates and token files rotate) and says what to send. */
  credentials(profile: ProfileConfig, now: number): Promise<Credentials>;
}
