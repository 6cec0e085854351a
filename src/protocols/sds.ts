// SDS: Envoy's own credential_injector filter takes each profile's header value as a generic
// secret named after the profile, so requests never wait on a hop to the sidecar. This file is
// the SecretDiscoveryService (state of the world, delta and fetch) over the token caches: a new
// token, or the loss of one, is pushed at once to every stream subscribed to that profile.
//
// Envoy 1.40 facts (DESIGN.md, "Ways Envoy takes the token"): a state-of-the-world response that
// leaves a secret out is ignored (the old value stays); a secret with an empty value makes the
// generic credential fail, and Envoy answers 401 itself. So a profile without a usable token, or
// a name that is no profile, is answered with an empty value, never left out.
import { Metadata, status as grpcStatus, type ServerDuplexStream, type ServerUnaryCall, type sendUnaryData } from '@grpc/grpc-js';
import type { ProfileConfig } from '../config.ts';
import type { Logger } from '../logger.ts';
import { authorizationValue, type Token } from '../token.ts';
import { loadService, messageType, packAny, type AnyMessage } from './wire.ts';

const SDS_SERVICE_NAME = 'envoy.service.secret.v3.SecretDiscoveryService';
export const SECRET_TYPE_URL = 'type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret';
export const sdsService = loadService('envoy/service/secret/v3/sds.proto', SDS_SERVICE_NAME);
const secretType = messageType('envoy/extensions/transport_sockets/tls/v3/secret.proto', 'envoy.extensions.transport_sockets.tls.v3.Secret');

/** A profile's tokens as the SDS server needs them: the current one, and word when it changes. */
export interface WatchedTokens {
  current(): Token | undefined;
  onChange(listener: () => void): unknown;
}

export interface SecretBinding {
  readonly config: ProfileConfig;
  // Optional in the type only because the ext_proc bindings, which the listener hands over as
  // they are, need no notifications; the constructor refuses a binding without it.
  readonly tokens: Omit<WatchedTokens, 'onChange'> & Partial<Pick<WatchedTokens, 'onChange'>>;
}

interface Status {
  code?: number;
  message?: string;
}

interface DiscoveryRequest {
  version_info?: string;
  resource_names?: string[];
  type_url?: string;
  response_nonce?: string;
  error_detail?: Status;
}

interface DiscoveryResponse {
  version_info: string;
  resources: AnyMessage[];
  type_url: string;
  nonce: string;
}

interface DeltaDiscoveryRequest {
  type_url?: string;
  resource_names_subscribe?: string[];
  resource_names_unsubscribe?: string[];
  initial_resource_versions?: Record<string, string>;
  response_nonce?: string;
  error_detail?: Status;
}

interface DeltaDiscoveryResponse {
  system_version_info: string;
  resources: Array<{ name: string; version: string; resource: AnyMessage }>;
  type_url: string;
  nonce: string;
}

type Failable = { emit(event: 'error', err: object): boolean };

/** Names Envoy asked for that are no profile: logged once each, up to this many. */
const UNKNOWN_NAMES_LOGGED = 100;
/** A subscription naming more secrets than this is refused (they come from Envoy's config). */
const MAX_NAMES_PER_STREAM = 1000;

/** One state-of-the-world stream. */
class SotwStream {
  /** Subscribed names; undefined = wildcard (every profile), which Envoy never asks for SDS. */
  names: Set<string> | undefined = new Set();
  nonce = '';
  private responses = 0;
  /** What the last response held (each name at its version), and what Envoy last rejected. */
  sentContent = '';
  nackedContent = '';
  readonly call: ServerDuplexStream<DiscoveryRequest, DiscoveryResponse>;
  readonly id: number;

  constructor(call: ServerDuplexStream<DiscoveryRequest, DiscoveryResponse>, id: number) {
    this.call = call;
    this.id = id;
  }

  nextNonce(): string {
    this.responses++;
    return `${this.id}.${this.responses}`;
  }
}

/** One delta stream: the subscribed names and the version Envoy holds of each. */
class DeltaStream {
  readonly names = new Set<string>();
  readonly held = new Map<string, string>();
  /** The nonce of the last response Envoy rejected and we logged. */
  nackedNonce = '';
  private responses = 0;
  readonly call: ServerDuplexStream<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;
  readonly id: number;

  constructor(call: ServerDuplexStream<DeltaDiscoveryRequest, DeltaDiscoveryResponse>, id: number) {
    this.call = call;
    this.id = id;
  }

  nextNonce(): string {
    this.responses++;
    return `${this.id}.${this.responses}`;
  }
}

export class SdsService {
  private readonly profiles = new Map<string, SecretBinding>();
  /** Per profile, bumped at each token change: the delta protocol's resource version. */
  private readonly versions = new Map<string, number>();
  /** Bumped at any profile's change: the state-of-the-world version. */
  private generation = 1;
  private readonly logger: Logger;
  private readonly sotw = new Set<SotwStream>();
  private readonly delta = new Set<DeltaStream>();
  private readonly unknownLogged = new Set<string>();
  private streamIds = 0;

  constructor(options: { profiles: readonly SecretBinding[]; logger: Logger }) {
    this.logger = options.logger;
    for (const binding of options.profiles) {
      const name = binding.config.name;
      this.profiles.set(name, binding);
      this.versions.set(name, 1);
      if (binding.tokens.onChange === undefined) throw new TypeError(`profile ${name}: its tokens give no change notifications, which SDS pushes need`);
      binding.tokens.onChange(() => this.changed(name));
    }
  }

  get streamsOpen(): number {
    return this.sotw.size + this.delta.size;
  }

  /** The grpc-js handlers, for `server.addService(sdsService, handlers)`. */
  get handlers(): Record<string, (...args: any[]) => void> {
    return { StreamSecrets: this.streamSecrets, DeltaSecrets: this.deltaSecrets, FetchSecrets: this.fetchSecrets };
  }

  /** The secret's value: the whole header value, or empty when there is no usable token. */
  private value(name: string): string {
    const token = this.profiles.get(name)?.tokens.current();
    return token === undefined ? '' : authorizationValue(token);
  }

  private secret(name: string): AnyMessage {
    return packAny(secretType, { name, generic_secret: { secret: { inline_bytes: Buffer.from(this.value(name), 'utf8') } } });
  }

  private changed(profile: string): void {
    this.versions.set(profile, this.versions.get(profile)! + 1);
    this.generation++;
    for (const stream of this.sotw) {
      if (stream.names === undefined || stream.names.has(profile)) this.sendSotw(stream);
    }
    for (const stream of this.delta) {
      if (stream.names.has(profile)) this.sendDelta(stream, [profile]);
    }
  }

  readonly streamSecrets = (call: ServerDuplexStream<DiscoveryRequest, DiscoveryResponse>): void => {
    const stream = new SotwStream(call, ++this.streamIds);
    this.sotw.add(stream);
    call.once('close', () => this.sotw.delete(stream));
    call.on('error', () => this.sotw.delete(stream));
    call.on('end', () => call.end());
    call.on('data', (request: DiscoveryRequest) => {
      try {
        this.onSotwRequest(stream, request);
      } catch (err) {
        this.fail(call, grpcStatus.INTERNAL, `SDS request failed: ${(err as Error).message}`);
      }
    });
  };

  private onSotwRequest(stream: SotwStream, request: DiscoveryRequest): void {
    if (!this.checkTypeUrl(stream.call, request.type_url)) return;
    const nonce = request.response_nonce ?? '';
    // A request answering an older response than the last one is stale: the newer response is
    // on its way and Envoy will answer that one (xDS protocol, "nonce").
    if (nonce !== '' && nonce !== stream.nonce) return;
    const names = this.subscription(stream.call, request.resource_names ?? []);
    if (names === false) return;
    if (request.error_detail !== undefined && request.error_detail !== null) {
      if (stream.nackedContent !== stream.sentContent) {
        stream.nackedContent = stream.sentContent;
        this.logger.warn({
          stream: stream.id,
          version: request.version_info,
          code: request.error_detail.code,
          reason: String(request.error_detail.message ?? '').slice(0, 500),
        }, 'Envoy rejected the secrets (SDS NACK); they are sent again at the next token change');
      }
    }
    stream.names = names;
    this.sendSotw(stream, nonce === '');
  }

  /** Sends the subscribed secrets unless Envoy holds (ACKed) or rejected exactly this content. */
  private sendSotw(stream: SotwStream, initial = false): void {
    const names = stream.names === undefined ? [...this.profiles.keys()] : [...stream.names];
    const content = names.map((name) => `${name}@${this.versions.get(name) ?? 0}`).join(',');
    if (!initial && (content === stream.sentContent || content === stream.nackedContent)) return;
    stream.sentContent = content;
    stream.nonce = stream.nextNonce();
    stream.call.write({
      version_info: String(this.generation),
      resources: names.map((name) => this.secret(name)),
      type_url: SECRET_TYPE_URL,
      nonce: stream.nonce,
    });
  }

  readonly deltaSecrets = (call: ServerDuplexStream<DeltaDiscoveryRequest, DeltaDiscoveryResponse>): void => {
    const stream = new DeltaStream(call, ++this.streamIds);
    this.delta.add(stream);
    call.once('close', () => this.delta.delete(stream));
    call.on('error', () => this.delta.delete(stream));
    call.on('end', () => call.end());
    call.on('data', (request: DeltaDiscoveryRequest) => {
      try {
        this.onDeltaRequest(stream, request);
      } catch (err) {
        this.fail(call, grpcStatus.INTERNAL, `SDS request failed: ${(err as Error).message}`);
      }
    });
  };

  private onDeltaRequest(stream: DeltaStream, request: DeltaDiscoveryRequest): void {
    if (!this.checkTypeUrl(stream.call, request.type_url)) return;
    // A NACK is logged once per rejected response; the rejected versions stay in `held`, so they
    // are not sent again, only a newer one.
    if (request.error_detail !== undefined && request.error_detail !== null && request.response_nonce !== stream.nackedNonce) {
      stream.nackedNonce = request.response_nonce ?? '';
      this.logger.warn({
        stream: stream.id,
        code: request.error_detail.code,
        reason: String(request.error_detail.message ?? '').slice(0, 500),
      }, 'Envoy rejected the secrets (SDS NACK); they are sent again at the next token change');
    }
    for (const [name, version] of Object.entries(request.initial_resource_versions ?? {})) stream.held.set(name, version);
    for (const name of request.resource_names_unsubscribe ?? []) {
      stream.names.delete(name);
      stream.held.delete(name);
    }
    const added = request.resource_names_subscribe ?? [];
    if (added.length === 0) return;
    if (!this.withinBound(stream.call, added.length + stream.names.size)) return;
    this.warnUnknown(added);
    for (const name of added) stream.names.add(name);
    this.sendDelta(stream, added);
  }

  /** Sends the named secrets whose version Envoy does not hold already. */
  private sendDelta(stream: DeltaStream, names: readonly string[]): void {
    const resources = [];
    for (const name of names) {
      const version = String(this.versions.get(name) ?? 0);
      if (stream.held.get(name) === version) continue;
      stream.held.set(name, version);
      resources.push({ name, version, resource: this.secret(name) });
    }
    if (resources.length === 0) return;
    stream.call.write({ system_version_info: String(this.generation), resources, type_url: SECRET_TYPE_URL, nonce: stream.nextNonce() });
  }

  readonly fetchSecrets = (call: ServerUnaryCall<DiscoveryRequest, DiscoveryResponse>, callback: sendUnaryData<DiscoveryResponse>): void => {
    const request = call.request;
    if (request.type_url !== undefined && request.type_url !== '' && request.type_url !== SECRET_TYPE_URL) {
      callback({ code: grpcStatus.INVALID_ARGUMENT, details: `this server serves ${SECRET_TYPE_URL} only` });
      return;
    }
    const names = request.resource_names ?? [];
    if (names.length > MAX_NAMES_PER_STREAM) {
      callback({ code: grpcStatus.INVALID_ARGUMENT, details: `more than ${MAX_NAMES_PER_STREAM} secret names` });
      return;
    }
    this.warnUnknown(names);
    const served = names.length === 0 ? [...this.profiles.keys()] : names;
    callback(null, {
      version_info: String(this.generation),
      resources: served.map((name) => this.secret(name)),
      type_url: SECRET_TYPE_URL,
      nonce: '',
    });
  };

  /**
   * The names of a request as a set (undefined for a wildcard: none, or `*`), with the ones
   * that are no profile logged once; false when the stream was failed.
   */
  private subscription(call: Failable, names: readonly string[]): Set<string> | undefined | false {
    if (!this.withinBound(call, names.length)) return false;
    if (names.length === 0 || names.includes('*')) return undefined;
    this.warnUnknown(names);
    return new Set(names);
  }

  private withinBound(call: Failable, count: number): boolean {
    if (count <= MAX_NAMES_PER_STREAM) return true;
    this.fail(call, grpcStatus.INVALID_ARGUMENT, `more than ${MAX_NAMES_PER_STREAM} secret names on one stream`);
    return false;
  }

  private warnUnknown(names: readonly string[]): void {
    for (const name of names) {
      if (this.profiles.has(name) || this.unknownLogged.has(name) || this.unknownLogged.size >= UNKNOWN_NAMES_LOGGED) continue;
      this.unknownLogged.add(name);
      this.logger.warn(
        { secret: name.slice(0, 100), configured: [...this.profiles.keys()] },
        'Envoy asks for a secret that is no profile: check the credential_injector sds_config names; it gets an empty value, so Envoy answers those requests with 401',
      );
    }
  }

  private checkTypeUrl(call: Failable, typeUrl: string | undefined): boolean {
    if (typeUrl === undefined || typeUrl === '' || typeUrl === SECRET_TYPE_URL) return true;
    this.fail(call, grpcStatus.INVALID_ARGUMENT, `this server serves ${SECRET_TYPE_URL} only, not ${typeUrl.slice(0, 200)}`);
    return false;
  }

  private fail(call: Failable, code: grpcStatus, details: string): void {
    call.emit('error', { code, details, metadata: new Metadata() });
  }
}
