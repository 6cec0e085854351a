// The ext_proc stream handler. One stream per HTTP request; every ProcessingRequest gets exactly
// one ProcessingResponse of its kind, at once, from replies encoded ahead of time. Nothing here
// waits on the token endpoint, and no path closes a stream with OK before request_headers is
// answered (that would tell Envoy "continue unchanged": the caller's key and no token).
import { Metadata, status as grpcStatus, type ServerDuplexStream } from '@grpc/grpc-js';
import type { ProfileConfig } from './config.ts';
import { DEFAULT_PROFILE } from './config.ts';
import { describeError } from './errors.ts';
import { continueWithoutToken, deny, emptyReply, injectToken, stripQueryParameters } from './header-mutation.ts';
import type { Logger } from './logger.ts';
import type { Metrics, RequestOutcome } from './metrics.ts';
import { decodeRequest, encodeResponse, REQUEST_KIND_NAMES, type EncodedReply, type PeekedRequest, type RequestKind } from './protocol.ts';
import type { Token } from './token.ts';

export const PROFILE_METADATA_KEY = 'x-oauth2-profile';

export interface TokenProvider {
  /** A usable token now, or undefined. Synchronous: called once per HTTP request. */
  current(): Token | undefined;
}

export interface ProfileBinding {
  readonly config: ProfileConfig;
  readonly tokens: TokenProvider;
}

type Call = ServerDuplexStream<PeekedRequest, EncodedReply>;

const EMPTY_REPLIES = new Map<RequestKind, EncodedReply>(
  REQUEST_KIND_NAMES.map((kind) => [kind, encodeResponse(emptyReply(kind))]),
);

/** The `request_headers` answer of one profile, re-encoded only when its token changes. */
class ProfileAnswer {
  private token: Token | undefined;
  private reply: EncodedReply;
  private outcome: { inc(): void };
  private readonly outcomes: Record<RequestOutcome, { inc(): void }>;
  readonly config: ProfileConfig;
  private readonly tokens: TokenProvider;
  /** `name=` of each query parameter to remove, to spot them in the raw message cheaply. */
  private readonly queryNeedles: readonly Buffer[];

  constructor(config: ProfileConfig, tokens: TokenProvider, metrics: Metrics) {
    this.config = config;
    this.tokens = tokens;
    this.queryNeedles = config.removeQueryParameters.map((name) => Buffer.from(`${name}=`, 'utf8'));
    const name = config.name;
    this.outcomes = {
      injected: metrics.requests.labels(name, 'injected'),
      denied: metrics.requests.labels(name, 'denied'),
      allowed_without_token: metrics.requests.labels(name, 'allowed_without_token'),
      unknown_profile: metrics.requests.labels(name, 'unknown_profile'),
      passthrough: metrics.requests.labels(name, 'passthrough'),
    };
    this.token = undefined;
    this.reply = this.encodeWithout();
    this.outcome = this.noTokenOutcome();
  }

  answer(request: PeekedRequest): EncodedReply {
    const token = this.tokens.current();
    if (token !== this.token) {
      this.token = token;
      this.reply = token === undefined ? this.encodeWithout() : encodeResponse(injectToken(this.config, token));
      this.outcome = token === undefined ? this.noTokenOutcome() : this.outcomes.injected;
    }
    this.outcome.inc();
    // Almost every request carries no key in its query: a byte search keeps them on the
    // prebuilt reply. Only a hit pays for decoding the headers and encoding a reply of its own.
    if (this.queryNeedles.length === 0 || !this.queryNeedles.some((n) => request.bytes.includes(n))) return this.reply;
    if (token === undefined && this.config.onFailure === 'deny') return this.reply;
    const path = pathOf(request);
    const stripped = path === undefined ? undefined : stripQueryParameters(path, this.config.removeQueryParameters);
    if (stripped === undefined) return this.reply;
    return encodeResponse(token === undefined ? continueWithoutToken(this.config, stripped) : injectToken(this.config, token, stripped));
  }

  get outcomeName(): RequestOutcome {
    return this.token !== undefined ? 'injected' : this.config.onFailure === 'allow' ? 'allowed_without_token' : 'denied';
  }

  private encodeWithout(): EncodedReply {
    return encodeResponse(this.config.onFailure === 'allow'
      ? continueWithoutToken(this.config)
      : deny(this.config.failureStatus, 'noToken', this.config.name));
  }

  private noTokenOutcome(): { inc(): void } {
    return this.config.onFailure === 'allow' ? this.outcomes.allowed_without_token : this.outcomes.denied;
  }
}

export class ExtProcService {
  private readonly answers = new Map<string, ProfileAnswer>();
  private readonly logger: Logger;
  private readonly metrics: Metrics;
  /** Deny answers for names Envoy sent that are not configured (bounded: they come from Envoy's config). */
  private readonly unknownProfileReplies = new Map<string, EncodedReply>();
  private readonly internalErrorReply = encodeResponse(deny(500, 'internal', ''));
  private readonly unknownProfilesLogged = new Set<string>();
  private openStreams = 0;

  constructor(options: { profiles: readonly ProfileBinding[]; logger: Logger; metrics: Metrics }) {
    for (const p of options.profiles) this.answers.set(p.config.name, new ProfileAnswer(p.config, p.tokens, options.metrics));
    this.logger = options.logger;
    this.metrics = options.metrics;
    // Read at scrape time: no per-stream gauge arithmetic through prom-client.
    this.metrics.observeOpenStreams(() => this.openStreams);
  }

  get streamsOpen(): number {
    return this.openStreams;
  }

  /** The grpc-js handler for ExternalProcessor/Process. */
  readonly process = (call: Call): void => {
    this.openStreams++;
    let open = true;
    const closed = (): void => {
      if (open) {
        open = false;
        this.openStreams--;
      }
    };
    // 'cancelled' is emitted for every finished call, not only failed ones: bookkeeping only.
    call.on('cancelled', closed);
    call.on('close', closed);
    call.on('finish', closed);
    call.on('error', (err: Error) => {
      this.logger.debug({ error: describeError(err) }, 'ext_proc stream error');
    });

    const profileName = profileFromMetadata(call.metadata);
    const answer = this.answers.get(profileName);
    if (answer === undefined && !this.unknownProfilesLogged.has(profileName) && this.unknownProfilesLogged.size < 100) {
      this.unknownProfilesLogged.add(profileName);
      this.logger.warn(
        { profile: profileName.slice(0, 100), metadataKey: PROFILE_METADATA_KEY, configured: [...this.answers.keys()] },
        'an ext_proc stream names a profile that is not configured: check grpc_initial_metadata in the Envoy route config; these requests are denied',
      );
    }

    call.on('data', (request: PeekedRequest) => {
      try {
        this.onMessage(call, request, profileName, answer);
      } catch (err) {
        // Never let a bug close the stream cleanly: deny this request instead.
        this.logger.error({ error: describeError(err), profile: profileName }, 'ext_proc handler failed; request denied');
        call.write(this.internalErrorReply);
      }
    });
    // Envoy half-closed its side: finish ours (graceful close, no reset needed).
    call.on('end', () => call.end());
  };

  private onMessage(call: Call, request: PeekedRequest, profileName: string, answer: ProfileAnswer | undefined): void {
    if (request.observabilityMode) return; // Envoy forbids replies in observability mode.
    const kind = request.kind;
    if (kind === undefined) {
      // A request kind this processor does not know (a newer Envoy?): fail the stream, never OK.
      call.emit('error', { code: grpcStatus.INVALID_ARGUMENT, details: 'ProcessingRequest carries no request kind this processor knows', metadata: new Metadata() });
      return;
    }
    if (kind !== 'request_headers') {
      call.write(EMPTY_REPLIES.get(kind)!);
      return;
    }
    if (answer === undefined) {
      const name = profileName.slice(0, 64);
      this.metrics.requests.labels(name, 'unknown_profile').inc();
      let reply = this.unknownProfileReplies.get(name);
      if (reply === undefined) {
        reply = encodeResponse(deny(500, 'unknownProfile', name));
        if (this.unknownProfileReplies.size < 100) this.unknownProfileReplies.set(name, reply);
      }
      call.write(reply);
      return;
    }
    const reply = answer.answer(request);
    call.write(reply);
    if (this.logger.isLevelEnabled('debug')) this.logRequest(request, profileName, answer.outcomeName);
  }

  private logRequest(request: PeekedRequest, profile: string, outcome: RequestOutcome): void {
    const headers = decodeRequest(request.bytes).request_headers?.headers?.headers ?? [];
    const names = new Set<string>();
    let method = '';
    let path = '';
    for (const h of headers) {
      const key = String(h.key ?? '').toLowerCase();
      names.add(key);
      if (key === ':method') method = headerValue(h);
      // The query string may carry a subscription key: log the path only.
      if (key === ':path') path = headerValue(h).split('?')[0] ?? '';
    }
    const config = this.answers.get(profile)?.config;
    this.logger.debug({
      profile,
      outcome,
      method,
      path,
      // Names only, never values: which of the headers we overwrite or remove the client sent.
      clientSent: config === undefined ? [] : [config.header, ...config.removeHeaders].filter((n) => names.has(n)),
    }, 'request_headers answered');
  }
}

function pathOf(request: PeekedRequest): string | undefined {
  const headers: Array<{ key?: string; value?: string; raw_value?: Buffer }> = decodeRequest(request.bytes).request_headers?.headers?.headers ?? [];
  const header = headers.find((h) => h.key === ':path');
  return header === undefined ? undefined : headerValue(header);
}

/** Envoy ≥1.27 sends `raw_value`; older ones `value`. Read raw_value when it is not empty. */
export function headerValue(header: { value?: string; raw_value?: Buffer | Uint8Array }): string {
  const raw = header.raw_value;
  if (raw !== undefined && raw.length > 0) return Buffer.from(raw).toString('utf8');
  return header.value ?? '';
}

function profileFromMetadata(metadata: Metadata): string {
  const value = metadata.get(PROFILE_METADATA_KEY)[0];
  if (value === undefined) return DEFAULT_PROFILE;
  const name = typeof value === 'string' ? value : value.toString('utf8');
  return name === '' ? DEFAULT_PROFILE : name;
}
