// The ext_proc stream handler. One stream per HTTP request; every ProcessingRequest gets exactly
// one ProcessingResponse of its kind, at once, from replies encoded ahead of time. Nothing here
// waits on the token endpoint, and no path closes a stream with OK before request_headers is
// answered (that would tell Envoy "continue unchanged": the caller's key and no token).
import { status as grpcStatus } from '@grpc/grpc-js';
import type { ProfileConfig } from '../config.ts';
import { DEFAULT_PROFILE } from '../config.ts';
import { describeError } from '../errors.ts';
import { continueWithoutToken, deny, emptyReply, injectToken, type RequestChanges } from './ext-proc-mutation.ts';
import type { Logger } from '../logger.ts';
import type { Metrics, RequestOutcome } from '../metrics.ts';
import { HeaderNamePolicy } from '../policy/header-names.ts';
import { QueryNamePolicy, type ByteString } from '../policy/query-names.ts';
import { decodeRequest, encodeResponse, findPath, HeaderSpellingScanner, messageText, peekRequest, REQUEST_KIND_NAMES, type PeekedRequest, type RequestKind } from './ext-proc-wire.ts';
import { grpcMessage, type GrpcCall } from './grpc-stream.ts';
import type { Token } from '../token.ts';

export const PROFILE_METADATA_KEY = 'x-oauth2-profile';

export interface TokenProvider {
  /** A usable token now, or undefined. Synchronous: called once per HTTP request. */
  current(): Token | undefined;
  /** The backend answered a request that carried `token` with a refresh.onBackendStatus status. */
  rejected?(token: Token, status: number): void;
}

export interface ProfileBinding {
  readonly config: ProfileConfig;
  readonly tokens: TokenProvider;
}

/** What an ext_proc stream carries from one message to the next (GrpcCall.session). */
interface Session {
  readonly profileName: string;
  readonly answer: ProfileAnswer | undefined;
  /**
   * The token the stream's request carried, kept only for profiles with refresh.onBackendStatus
   * (their routes send response headers too), until the response headers say how it was taken.
   */
  carried: Token | undefined;
  sawRequestHeaders: boolean;
}

/** A ProcessingResponse encoded and framed: what GrpcCall.write sends as it is. */
type Reply = Buffer;

function encodeReply(response: object): Reply {
  return grpcMessage(encodeResponse(response));
}

const EMPTY_REPLIES = new Map<RequestKind, Reply>(
  REQUEST_KIND_NAMES.map((kind) => [kind, encodeReply(emptyReply(kind))]),
);

/** A configured profile's `request_headers` answers per outcome, read by /metrics when scraped. */
type ProfileOutcome = Exclude<RequestOutcome, 'unknown_profile'>;
type OutcomeCounts = Record<ProfileOutcome, number>;

function zeroCounts(): OutcomeCounts {
  return { injected: 0, denied: 0, allowed_without_token: 0 };
}

/** The `request_headers` answer of one profile, re-encoded only when its token changes. */
class ProfileAnswer {
  private token: Token | undefined;
  private reply: Reply;
  private outcome: ProfileOutcome;
  readonly counts: OutcomeCounts = zeroCounts();
  readonly config: ProfileConfig;
  private readonly tokens: TokenProvider;
  /** Which query parameters go (docs/query-names.md), compiled once. */
  readonly queryNames: QueryNamePolicy;
  /** The headers removed or overwritten, and their other spellings (`_` for `-`). */
  readonly headerNames: HeaderNamePolicy;
  private readonly headerSpellings: HeaderSpellingScanner;

  constructor(config: ProfileConfig, tokens: TokenProvider) {
    this.config = config;
    this.tokens = tokens;
    this.queryNames = new QueryNamePolicy(config.removeQueryParameters);
    this.headerNames = new HeaderNamePolicy([config.header, ...config.removeHeaders]);
    this.headerSpellings = new HeaderSpellingScanner(this.headerNames);
    this.token = undefined;
    this.reply = this.encodeWithout();
    this.outcome = this.noTokenOutcome();
  }

  answer(request: PeekedRequest): Reply {
    const token = this.tokens.current();
    if (token !== this.token) {
      this.token = token;
      this.reply = token === undefined ? this.encodeWithout() : encodeReply(injectToken(this.config, token));
      this.outcome = token === undefined ? this.noTokenOutcome() : 'injected';
    }
    const reply = this.replyFor(request, token);
    this.counts[this.outcome]++; // after the reply is built: a request that failed is not counted
    return reply;
  }

  get outcomeName(): ProfileOutcome {
    return this.outcome;
  }

  /** The token the last answer carried (the one a request just answered now carries). */
  get lastToken(): Token | undefined {
    return this.token;
  }

  /** refresh.onBackendStatus: the backend refused the token a request carried. */
  backendAnswered(token: Token, status: number): void {
    if (this.config.refresh.onBackendStatus.includes(status)) this.tokens.rejected?.(token, status);
  }

  /**
   * The prebuilt reply, unless this request needs more: almost every request has no other
   * spelling of a removed header and nothing in its query that could be a removed parameter
   * (QueryNamePolicy.mayMatch: a byte scan and a substring search), and stays on it.
   */
  private replyFor(request: PeekedRequest, token: Token | undefined): Reply {
    if (token === undefined && this.config.onFailure === 'deny') return this.reply;
    const changes = this.changesFor(request);
    if (changes === undefined) return this.reply;
    return encodeReply(token === undefined ? continueWithoutToken(this.config, changes) : injectToken(this.config, token, changes));
  }

  /** What this request needs beyond the prebuilt reply, or undefined when nothing. */
  changesFor(request: PeekedRequest): RequestChanges | undefined {
    if (this.headerSpellings.empty && this.queryNames.empty) return undefined;
    const text = messageText(request.bytes);
    const removeHeaders = this.headerSpellings.empty ? undefined : this.headerSpellings.find(text);
    let path: ByteString | undefined;
    if (!this.queryNames.empty) {
      const original = findPath(text) ?? pathOf(request);
      if (original !== undefined) path = this.queryNames.strip(original);
    }
    return path === undefined && removeHeaders === undefined ? undefined : { path, removeHeaders };
  }

  private encodeWithout(): Reply {
    return encodeReply(this.config.onFailure === 'allow'
      ? continueWithoutToken(this.config)
      : deny(this.config.failureStatus, 'noToken', this.config.name));
  }

  private noTokenOutcome(): ProfileOutcome {
    return this.config.onFailure === 'allow' ? 'allowed_without_token' : 'denied';
  }
}

/** Names Envoy sent that are not configured; past this many, they are counted under one label. */
const UNKNOWN_PROFILES_TRACKED = 100;
const OTHER_UNKNOWN_PROFILE = '(other)';

export class ExtProcService {
  private readonly answers = new Map<string, ProfileAnswer>();
  private readonly logger: Logger;
  /** Deny answers for names Envoy sent that are not configured (bounded: they come from Envoy's config). */
  private readonly unknownProfileReplies = new Map<string, Reply>();
  private readonly internalErrorReply = encodeReply(deny(500, 'internal', ''));
  private readonly unknownProfilesLogged = new Set<string>();
  private readonly unknownProfileCounts = new Map<string, number>();
  private openStreams = 0;

  constructor(options: { profiles: readonly ProfileBinding[]; logger: Logger; metrics: Metrics }) {
    for (const p of options.profiles) this.answers.set(p.config.name, new ProfileAnswer(p.config, p.tokens));
    this.logger = options.logger;
    // Both read at scrape time: no per-message label lookup or gauge arithmetic in prom-client.
    options.metrics.observeOpenStreams(() => this.openStreams);
    options.metrics.observeRequests(() => this.requestCounts());
  }

  get streamsOpen(): number {
    return this.openStreams;
  }

  /**
   * A new ext_proc stream (grpc-stream.ts): which profile it answers for, from the
   * x-oauth2-profile metadata Envoy sends with it.
   */
  open(call: GrpcCall): void {
    this.openStreams++;
    const profileName = call.metadata(PROFILE_METADATA_KEY) || DEFAULT_PROFILE;
    const answer = this.answers.get(profileName);
    if (answer === undefined) this.warnUnknownProfile(profileName);
    const session: Session = { profileName, answer, carried: undefined, sawRequestHeaders: false };
    call.session = session;
  }

  /** One ProcessingRequest: exactly one reply of its kind, or an error status. */
  message(call: GrpcCall, bytes: Buffer): void {
    const session = call.session as Session;
    let request: PeekedRequest;
    try {
      request = peekRequest(bytes);
    } catch {
      call.fail(grpcStatus.INVALID_ARGUMENT, 'the ProcessingRequest cannot be decoded');
      return;
    }
    try {
      this.onMessage(call, request, session);
    } catch (err) {
      // Never let a bug close the stream cleanly: deny this request instead.
      this.logger.error({ error: describeError(err), profile: session.profileName }, 'ext_proc handler failed; request denied');
      call.write(this.internalErrorReply);
    }
  }

  /**
   * Envoy half-closed its side (graceful close): finish ours with OK, once request_headers was
   * answered. A stream that ends before that carried nothing to forward: it gets an error
   * status, so that no reading of it means "continue unchanged".
   */
  end(call: GrpcCall): void {
    if ((call.session as Session).sawRequestHeaders) call.finish();
    else call.fail(grpcStatus.INVALID_ARGUMENT, 'the stream ended before request_headers');
  }

  closed(call: GrpcCall): void {
    this.openStreams--;
    call.session = undefined;
  }

  private warnUnknownProfile(profileName: string): void {
    if (this.unknownProfilesLogged.has(profileName) || this.unknownProfilesLogged.size >= UNKNOWN_PROFILES_TRACKED) return;
    this.unknownProfilesLogged.add(profileName);
    this.logger.warn(
      { profile: profileName.slice(0, 100), metadataKey: PROFILE_METADATA_KEY, configured: [...this.answers.keys()] },
      'an ext_proc stream names a profile that is not configured: check grpc_initial_metadata in the Envoy route config; these requests are denied',
    );
  }

  private *requestCounts(): Generator<readonly [string, RequestOutcome, number]> {
    for (const [name, answer] of this.answers) {
      for (const outcome of Object.keys(answer.counts) as ProfileOutcome[]) yield [name, outcome, answer.counts[outcome]];
    }
    for (const [name, count] of this.unknownProfileCounts) yield [name, 'unknown_profile', count];
  }

  private onMessage(call: GrpcCall, request: PeekedRequest, session: Session): void {
    const kind = request.kind;
    if (kind === 'request_headers') session.sawRequestHeaders = true;
    if (request.observabilityMode) return; // Envoy forbids replies in observability mode.
    if (kind === undefined) {
      // A request kind this processor does not know (a newer Envoy?): fail the stream, never OK.
      call.fail(grpcStatus.INVALID_ARGUMENT, 'ProcessingRequest carries no request kind this processor knows');
      return;
    }
    const { answer, profileName } = session;
    if (kind !== 'request_headers') {
      if (kind === 'response_headers' && answer !== undefined) this.responseHeaders(session, request, answer);
      call.write(EMPTY_REPLIES.get(kind)!);
      return;
    }
    if (answer === undefined) {
      const name = profileName.slice(0, 64);
      const counted = this.unknownProfileCounts.has(name) || this.unknownProfileCounts.size < UNKNOWN_PROFILES_TRACKED ? name : OTHER_UNKNOWN_PROFILE;
      this.unknownProfileCounts.set(counted, (this.unknownProfileCounts.get(counted) ?? 0) + 1);
      let reply = this.unknownProfileReplies.get(name);
      if (reply === undefined) {
        reply = encodeReply(deny(500, 'unknownProfile', name));
        if (this.unknownProfileReplies.size < UNKNOWN_PROFILES_TRACKED) this.unknownProfileReplies.set(name, reply);
      }
      call.write(reply);
      return;
    }
    const reply = answer.answer(request);
    call.write(reply);
    if (answer.config.refresh.onBackendStatus.length > 0) session.carried = answer.lastToken;
    if (this.logger.isLevelEnabled('debug')) this.logRequest(request, profileName, answer);
  }

  /** A route that sends response headers: did the backend refuse the token this request carried? */
  private responseHeaders(session: Session, request: PeekedRequest, answer: ProfileAnswer): void {
    const token = session.carried;
    if (token === undefined) return;
    session.carried = undefined;
    const headers: Array<{ key?: string; value?: string; raw_value?: Buffer }> = decodeRequest(request.bytes).response_headers?.headers?.headers ?? [];
    const header = headers.find((h) => h.key === ':status');
    const status = header === undefined ? NaN : Number(headerValue(header));
    if (Number.isInteger(status)) answer.backendAnswered(token, status);
  }

  private logRequest(request: PeekedRequest, profile: string, answer: ProfileAnswer): void {
    const headers = decodeRequest(request.bytes).request_headers?.headers?.headers ?? [];
    const names = new Set<string>();
    let method = '';
    let path = '';
    for (const h of headers) {
      const key = String(h.key ?? '').toLowerCase();
      names.add(key);
      if (key === ':method') method = headerValue(h);
      // The query may carry a subscription key: log the path without it, never a query value.
      if (key === ':path') path = headerValue(h).split('?')[0] ?? '';
    }
    const { config } = answer;
    this.logger.debug({
      profile,
      outcome: answer.outcomeName,
      method,
      path,
      // Names only, never values: which of the headers we overwrite or remove the client sent,
      // under their own names or another spelling.
      clientSent: [
        ...[config.header, ...config.removeHeaders].filter((n) => names.has(n)),
        ...answer.headerNames.otherSpellings(names),
      ],
    }, 'request_headers answered');
  }
}

/** `:path` as a byte string, from the decoded message (when findPath could not read it). */
function pathOf(request: PeekedRequest): ByteString | undefined {
  const headers: Array<{ key?: string; value?: string; raw_value?: Buffer }> = decodeRequest(request.bytes).request_headers?.headers?.headers ?? [];
  const header = headers.find((h) => h.key === ':path');
  if (header === undefined) return undefined;
  const raw = header.raw_value;
  return raw !== undefined && raw.length > 0 ? Buffer.from(raw).toString('latin1') : Buffer.from(header.value ?? '', 'utf8').toString('latin1');
}

/** Envoy ≥1.27 sends `raw_value`; older ones `value`. Read raw_value when it is not empty. */
function headerValue(header: { value?: string; raw_value?: Buffer | Uint8Array }): string {
  const raw = header.raw_value;
  if (raw !== undefined && raw.length > 0) return Buffer.from(raw).toString('utf8');
  return header.value ?? '';
}
