// ext_authz: Envoy's `Authorization/Check`, for proxies that offer ext_authz but not ext_proc
// (Istio's CUSTOM AuthorizationPolicy, Envoy Gateway's SecurityPolicy.extAuth). One check per
// request; the answer sets the token header and removes the subscription key, as the ext_proc
// answer does, from the same policies (src/policy/) and the same deny answer (src/policy/deny.ts).
//
// Envoy 1.40 facts (DESIGN.md, "Ways Envoy takes the token"): `query_parameters_to_remove`
// matches a parameter's raw name exactly and splits the query at `&` only, so the answer lists
// each raw name the request carries; OK headers carry `append: false` explicitly (newer Envoys
// fall back to `append_action`, whose default appends).
import { status as grpcStatus, type ServerUnaryCall, type sendUnaryData } from '@grpc/grpc-js';
import type { ProfileConfig } from '../config.ts';
import { DEFAULT_PROFILE } from '../config.ts';
import { describeError, type DenyReason } from '../errors.ts';
import type { Logger } from '../logger.ts';
import type { Metrics, RequestOutcome } from '../metrics.ts';
import { denyAnswer } from '../policy/deny.ts';
import { HeaderNamePolicy } from '../policy/header-names.ts';
import { QueryNamePolicy, type ByteString } from '../policy/query-names.ts';
import { authorizationValue, type Token } from '../token.ts';
import { authzService, encodeCheckResponse, type PeekedCheck } from './ext-authz-wire.ts';

export { authzService };
/** The context extension (per route in Envoy: `check_settings.context_extensions`) naming the profile. */
export const PROFILE_EXTENSION = 'x-oauth2-profile';

export interface AuthzBinding {
  readonly config: ProfileConfig;
  readonly tokens: { current(): Token | undefined };
}

interface HeaderOption {
  header: { key: string; value: string };
  append: { value: false };
}

export type CheckResponse =
  | { status: { code: 0 }; ok_response: { headers: HeaderOption[]; headers_to_remove: string[]; query_parameters_to_remove: string[] } }
  | { status: { code: number; message: string }; denied_response: { status: { code: number }; headers: HeaderOption[]; body: string } };

/** gRPC status of each deny (Envoy denies on any non-OK; the HTTP status is denied_response's). */
const DENY_CODES: Record<DenyReason, grpcStatus> = {
  noToken: grpcStatus.UNAVAILABLE,
  unknownProfile: grpcStatus.FAILED_PRECONDITION,
  internal: grpcStatus.INTERNAL,
};

/** Names Envoy sent that are not configured: logged once each, up to this many. */
const UNKNOWN_PROFILES_LOGGED = 100;

/** The check answer for one profile; the usual one (nothing but the profile's own removals) encoded once per token. */
class ProfilePolicy {
  readonly config: ProfileConfig;
  private readonly tokens: { current(): Token | undefined };
  private readonly headerNames: HeaderNamePolicy;
  private readonly queryNames: QueryNamePolicy;
  private readonly denied: Buffer;
  private token: Token | undefined;
  private usual: Buffer;
  /** Checks answered per outcome, read by /metrics when scraped (plain integers, as ext_proc's). */
  readonly counts = { injected: 0, denied: 0, allowed_without_token: 0 };

  constructor(binding: AuthzBinding) {
    this.config = binding.config;
    this.tokens = binding.tokens;
    this.headerNames = new HeaderNamePolicy([this.config.header, ...this.config.removeHeaders]);
    this.queryNames = new QueryNamePolicy(this.config.removeQueryParameters);
    this.denied = encodeCheckResponse(denial(this.config.failureStatus, 'noToken', this.config.name));
    this.token = undefined;
    this.usual = encodeCheckResponse(this.allowed(undefined, [], []));
  }

  answer(request: PeekedCheck): Buffer {
    const token = this.tokens.current();
    if (token === undefined && this.config.onFailure === 'deny') {
      this.counts.denied++;
      return this.denied;
    }
    this.counts[token === undefined ? 'allowed_without_token' : 'injected']++;
    if (token !== this.token) {
      this.token = token;
      this.usual = encodeCheckResponse(this.allowed(token, [], []));
    }
    const spellings = this.headerNames.otherSpellings(request.headerNames);
    const parameters = this.removedParameters(request.path);
    if (spellings.length === 0 && parameters.length === 0) return this.usual;
    return encodeCheckResponse(this.allowed(token, spellings, parameters));
  }

  /** OK: the token header set (or, without a token under onFailure: allow, removed), the removals. */
  allowed(token: Token | undefined, spellings: readonly string[], parameters: string[]): CheckResponse {
    const remove = [...this.config.removeHeaders, ...spellings];
    const headers: HeaderOption[] = [];
    // With no token (onFailure: allow) the caller's own value goes, so it never passes as ours.
    if (token === undefined) remove.push(this.config.header);
    else headers.push(option(this.config.header, authorizationValue(token)));
    return { status: { code: 0 }, ok_response: { headers, headers_to_remove: remove, query_parameters_to_remove: parameters } };
  }

  /**
   * The raw names, as Envoy splits the query (at `&`, name before the first `=`), of every
   * parameter the query policy removes. A `;`-separated piece (a separator to Rack 2 and older
   * Python) that is a removed one takes its whole `&` segment with it: Envoy cannot remove less.
   */
  private removedParameters(path: string): string[] {
    const q = path.indexOf('?');
    if (q < 0 || this.queryNames.empty) return [];
    const query: ByteString = Buffer.from(path.slice(q + 1), 'utf8').toString('latin1');
    if (!this.queryNames.mayMatch(query)) return [];
    const names = new Set<string>();
    for (const segment of query.split('&')) {
      const removed = segment.split(';').some((piece) => {
        const eq = piece.indexOf('=');
        return this.queryNames.isRemoved(eq < 0 ? piece : piece.slice(0, eq));
      });
      if (!removed) continue;
      const eq = segment.indexOf('=');
      names.add(Buffer.from(eq < 0 ? segment : segment.slice(0, eq), 'latin1').toString('utf8'));
    }
    return [...names];
  }
}

export class ExtAuthzService {
  private readonly policies = new Map<string, ProfilePolicy>();
  private readonly logger: Logger;
  private readonly unknownLogged = new Set<string>();
  private readonly internalError = encodeCheckResponse(denial(500, 'internal', ''));
  /** Deny answers for names Envoy sent that are not configured (bounded: they come from its config). */
  private readonly unknownReplies = new Map<string, Buffer>();
  /** Checks naming a profile that is not configured, by name (bounded like the log). */
  private readonly unknownCounts = new Map<string, number>();

  constructor(options: { profiles: readonly AuthzBinding[]; logger: Logger; metrics?: Metrics }) {
    for (const binding of options.profiles) this.policies.set(binding.config.name, new ProfilePolicy(binding));
    this.logger = options.logger;
    options.metrics?.observeChecks(() => this.checkCounts());
  }

  private *checkCounts(): Generator<readonly [string, RequestOutcome, number]> {
    for (const [name, policy] of this.policies) {
      for (const [outcome, count] of Object.entries(policy.counts)) yield [name, outcome as RequestOutcome, count];
    }
    for (const [name, count] of this.unknownCounts) yield [name, 'unknown_profile', count];
  }

  /** The grpc-js handlers, for `server.addService(authzService, handlers)`. */
  get handlers(): Record<string, (...args: any[]) => void> {
    return { Check: this.check };
  }

  readonly check = (call: ServerUnaryCall<PeekedCheck, Buffer>, callback: sendUnaryData<Buffer>): void => {
    let response: Buffer;
    try {
      response = this.answer(call.request);
    } catch (err) {
      // Never an OK by accident: deny instead.
      this.logger.error({ error: describeError(err) }, 'ext_authz check failed; request denied');
      response = this.internalError;
    }
    callback(null, response);
  };

  answer(request: PeekedCheck): Buffer {
    const named = request.extensions.get(PROFILE_EXTENSION);
    const name = named === undefined || named === '' ? DEFAULT_PROFILE : named;
    const policy = this.policies.get(name);
    if (policy !== undefined) return policy.answer(request);
    this.warnUnknown(name);
    const shown = name.slice(0, 64);
    const counted = this.unknownCounts.has(shown) || this.unknownCounts.size < UNKNOWN_PROFILES_LOGGED ? shown : '(other)';
    this.unknownCounts.set(counted, (this.unknownCounts.get(counted) ?? 0) + 1);
    let reply = this.unknownReplies.get(shown);
    if (reply === undefined) {
      reply = encodeCheckResponse(denial(500, 'unknownProfile', shown));
      if (this.unknownReplies.size < UNKNOWN_PROFILES_LOGGED) this.unknownReplies.set(shown, reply);
    }
    return reply;
  }

  private warnUnknown(name: string): void {
    if (this.unknownLogged.has(name) || this.unknownLogged.size >= UNKNOWN_PROFILES_LOGGED) return;
    this.unknownLogged.add(name);
    this.logger.warn(
      { profile: name.slice(0, 100), contextExtension: PROFILE_EXTENSION, configured: [...this.policies.keys()] },
      'an ext_authz check names a profile that is not configured: check the route\'s context_extensions; these requests are denied',
    );
  }
}

/** The deny answer ext_proc gives too (src/policy/deny.ts: status, headers, JSON body), as a denied CheckResponse. */
function denial(status: number, reason: DenyReason, profile: string): CheckResponse {
  const answer = denyAnswer(status, reason, profile);
  return {
    status: { code: DENY_CODES[reason], message: answer.details },
    denied_response: {
      status: { code: answer.status },
      headers: answer.headers.map(([name, value]) => option(name, value)),
      body: answer.body,
    },
  };
}

function option(key: string, value: string): HeaderOption {
  return { header: { key, value }, append: { value: false } };
}
