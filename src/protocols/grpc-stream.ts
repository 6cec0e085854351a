// One gRPC call on its HTTP/2 stream, spoken by hand: the gRPC over HTTP/2 wire format
// (length-prefixed messages, status in trailers) for the ext_proc Process method alone. grpc-js
// builds some twenty objects, several object-mode streams and a chain of interceptors for every
// call; a stream per HTTP request made that most of the sidecar's CPU per request
// (docs/benchmarks.md). Health, SDS and ext_authz stay on grpc-js, on the same port.
//
// Fail closed: a call ends with status OK only when its handler says so; every error on the wire
// (a compressed or oversized message, a stream that breaks) ends it with an error status or a
// reset, which Envoy never reads as "continue unchanged".
import type { IncomingHttpHeaders, OutgoingHttpHeaders, ServerHttp2Stream } from 'node:http2';
import { constants as http2Constants } from 'node:http2';
import { status as grpcStatus } from '@grpc/grpc-js';

/** What a call's owner is told: each complete message, the client's half-close, the end. */
export interface CallHandler {
  message(call: GrpcCall, bytes: Buffer): void;
  /** The client ended its side; no more messages come. */
  end(call: GrpcCall): void;
  /** The HTTP/2 stream is gone (ended, reset or failed): called once. */
  closed(call: GrpcCall): void;
}

const PREFIX_BYTES = 5;

/** The size of one message, and of the messages held in part by every call of one listener. */
export class MessageBudget {
  readonly maxMessageBytes: number;
  readonly maxPartialBytes: number;
  /** Bytes held now. */
  partialBytes = 0;

  constructor(maxMessageBytes: number, maxPartialBytes: number) {
    this.maxMessageBytes = maxMessageBytes;
    this.maxPartialBytes = maxPartialBytes;
  }
}

const RESPONSE_HEADERS: OutgoingHttpHeaders = { ':status': 200, 'content-type': 'application/grpc', 'grpc-accept-encoding': 'identity' };
const OK_TRAILERS: OutgoingHttpHeaders = { 'grpc-status': '0' };
/** What trailers asked for with no status set would carry (no path does that): never OK. */
const INTERNAL_TRAILERS: OutgoingHttpHeaders = { 'grpc-status': String(grpcStatus.INTERNAL), 'grpc-message': 'no status was set' };

/** Where the call sits on its HTTP/2 stream, so that one shared listener serves every stream. */
const CALL = Symbol('oauth2-extproc gRPC call');
type Carrier = ServerHttp2Stream & { [CALL]?: GrpcCall };

export class GrpcCall {
  readonly stream: ServerHttp2Stream;
  readonly headers: IncomingHttpHeaders;
  private readonly handler: CallHandler;
  private readonly budget: MessageBudget;
  /** A message prefix cut between frames, up to 5 bytes. */
  private head: Buffer | undefined;
  /** A message that came in part: allocated at its announced length, `filled` bytes in. */
  private body: Buffer | undefined;
  private filled = 0;
  /** When the message in `body` began (Date.now()), or 0: an unfinished one is held only so long. */
  partialSince = 0;
  private headersSent = false;
  /** Trailers to send once the replies are out, or undefined while the call is open. */
  private trailers: OutgoingHttpHeaders | undefined;
  /** The owner's bookkeeping (grpc-listener.ts: its clock's ticks, and messages seen). */
  openedAt = 0;
  lastActive = 0;
  messages = 0;
  failedAt = 0;
  /** The protocol's per-call state (ext_proc: the profile this stream answers for). */
  session: unknown;

  constructor(stream: ServerHttp2Stream, headers: IncomingHttpHeaders, handler: CallHandler, budget: MessageBudget) {
    this.stream = stream;
    this.headers = headers;
    this.handler = handler;
    this.budget = budget;
    (stream as Carrier)[CALL] = this;
    stream.on('data', onData);
    stream.on('end', onEnd);
    stream.on('close', onClose);
    stream.on('error', ignore); // a reset by the peer; 'close' follows
  }

  /** A metadata value as the client sent it (the first, if it sent the key twice). */
  metadata(key: string): string | undefined {
    const value = this.headers[key];
    if (value === undefined) return undefined;
    const first = Array.isArray(value) ? value[0] : value;
    if (first === undefined) return undefined;
    const comma = first.indexOf(','); // a key sent twice arrives joined by ", "
    return (comma < 0 ? first : first.slice(0, comma)).trim();
  }

  /** Replies not yet taken by the client, in bytes. */
  get unsentBytes(): number {
    return this.stream.writableLength;
  }

  /** True once a status (OK or not) was sent. */
  get statusSent(): boolean {
    return this.trailers !== undefined;
  }

  /** True once a status was sent or the stream is gone. */
  get done(): boolean {
    return this.trailers !== undefined || this.stream.destroyed || this.stream.closed;
  }

  /** Sends one message, framed with its prefix by grpcMessage(). */
  write(message: Buffer): void {
    if (this.done) return;
    if (!this.headersSent) {
      this.headersSent = true;
      this.stream.respond(RESPONSE_HEADERS, { waitForTrailers: true });
      this.stream.on('wantTrailers', onWantTrailers);
    }
    this.stream.write(message);
  }

  /** Ends the call with status OK, after every reply written. */
  finish(): void {
    this.sendStatus(OK_TRAILERS);
  }

  /** Ends the call with an error status (never OK). */
  fail(code: grpcStatus, details: string): void {
    this.sendStatus({ 'grpc-status': String(code === grpcStatus.OK ? grpcStatus.UNKNOWN : code), 'grpc-message': percentEncode(details) });
  }

  /** RST_STREAM: for a client that does not read, whose status would queue behind its replies. */
  reset(code: number = http2Constants.NGHTTP2_CANCEL): void {
    if (!this.stream.destroyed && !this.stream.closed) this.stream.close(code);
  }

  private sendStatus(trailers: OutgoingHttpHeaders): void {
    if (this.done) return;
    this.trailers = trailers;
    this.dropPartial();
    if (this.headersSent) {
      this.stream.end(); // 'wantTrailers' once every reply is out
    } else {
      // Trailers-Only: the status in the one HEADERS frame.
      this.stream.respond({ ...RESPONSE_HEADERS, ...trailers }, { endStream: true });
    }
  }

  /**
   * Splits what arrived into messages: one DATA frame may hold several, or part of one. A whole
   * message in one frame is handed on as a view of it; one over several frames is copied once,
   * into a buffer of its announced length, counted against the port's budget.
   */
  received(chunk: Buffer): void {
    let at = 0;
    while (at < chunk.length && this.trailers === undefined) {
      if (this.body !== undefined) {
        const n = Math.min(this.body.length - this.filled, chunk.length - at);
        chunk.copy(this.body, this.filled, at, at + n);
        this.filled += n;
        at += n;
        if (this.filled < this.body.length) return;
        const message = this.body;
        this.dropPartial();
        this.handler.message(this, message);
        continue;
      }
      let prefix: Buffer;
      if (this.head === undefined && chunk.length - at >= PREFIX_BYTES) {
        prefix = chunk.subarray(at, at + PREFIX_BYTES);
        at += PREFIX_BYTES;
      } else {
        // A prefix cut between frames (a client writing byte by byte): at most 5 bytes kept.
        this.head ??= Buffer.alloc(0);
        const n = Math.min(PREFIX_BYTES - this.head.length, chunk.length - at);
        this.head = Buffer.concat([this.head, chunk.subarray(at, at + n)]);
        at += n;
        if (this.head.length < PREFIX_BYTES) return;
        prefix = this.head;
        this.head = undefined;
      }
      const length = this.checkedLength(prefix);
      if (length < 0) return;
      if (chunk.length - at >= length) {
        this.handler.message(this, chunk.subarray(at, at + length));
        at += length;
        continue;
      }
      if (this.budget.partialBytes + length > this.budget.maxPartialBytes) {
        this.fail(grpcStatus.RESOURCE_EXHAUSTED, 'too many messages in progress on this port');
        return;
      }
      this.body = Buffer.allocUnsafe(length);
      this.filled = 0;
      this.budget.partialBytes += length;
      this.partialSince = Date.now();
    }
  }

  /** The message length a prefix announces, or -1 once the call is failed for it. */
  private checkedLength(prefix: Buffer): number {
    const compressed = prefix[0]!;
    const length = prefix.readUInt32BE(1);
    if (compressed !== 0) {
      // No grpc-encoding is accepted (grpc-accept-encoding: identity): a compressed message
      // cannot be read, and is a protocol error (gRPC over HTTP/2, "Compressed-Flag").
      this.fail(grpcStatus.INTERNAL, compressed === 1 ? 'compressed messages are not accepted' : 'malformed gRPC message prefix');
      return -1;
    }
    if (length > this.budget.maxMessageBytes) {
      this.fail(grpcStatus.RESOURCE_EXHAUSTED, `Received message larger than max (${length} vs. ${this.budget.maxMessageBytes})`);
      return -1;
    }
    return length;
  }

  private dropPartial(): void {
    this.head = undefined;
    if (this.body === undefined) return;
    this.budget.partialBytes -= this.body.length;
    this.body = undefined;
    this.partialSince = 0;
  }

  /** After a throw in the wire code: an INTERNAL status if one can still be sent, else a reset. */
  failOrReset(): void {
    try {
      if (this.trailers === undefined) this.fail(grpcStatus.INTERNAL, 'the sidecar failed to process the stream');
      else this.reset(http2Constants.NGHTTP2_INTERNAL_ERROR);
    } catch {
      destroyWithError(this.stream);
    }
  }

  /** The client half-closed (onEnd): a message it left unfinished fails the call. */
  ended(): void {
    if (this.trailers !== undefined) return;
    if (this.head !== undefined || this.body !== undefined) {
      this.fail(grpcStatus.INTERNAL, 'the stream ended inside a message');
      return;
    }
    this.handler.end(this);
  }

  /** The HTTP/2 stream is gone (onClose): what it held of the budget is given back. */
  gone(): void {
    this.dropPartial();
    this.handler.closed(this);
  }

  /** Node asks for the trailers once every reply is out (onWantTrailers). */
  sendTrailers(): void {
    if (!this.stream.destroyed) this.stream.sendTrailers(this.trailers ?? INTERNAL_TRAILERS);
  }
}

// The stream's listeners. Whatever throws in one (the handlers guard their own code; this is the
// net under the wire code) ends that call with an error status, or a reset: never OK, never a
// crash of the process.
function onData(this: Carrier, chunk: Buffer): void {
  const call = this[CALL];
  try {
    call?.received(chunk);
  } catch {
    call?.failOrReset();
  }
}

function onEnd(this: Carrier): void {
  const call = this[CALL];
  try {
    call?.ended();
  } catch {
    call?.failOrReset();
  }
}

function onClose(this: Carrier): void {
  this[CALL]?.gone();
}

function onWantTrailers(this: Carrier): void {
  try {
    this[CALL]?.sendTrailers();
  } catch {
    destroyWithError(this);
  }
}

/** The last resort: RST_STREAM INTERNAL_ERROR (a bare destroy() would send NO_ERROR). */
function destroyWithError(stream: ServerHttp2Stream): void {
  try {
    stream.close(http2Constants.NGHTTP2_INTERNAL_ERROR);
  } catch {
    stream.destroy();
  }
}

/** An 'error' listener for a stream whose 'close' does the work (a reset by the peer, or our own). */
export function ignore(): void {}

/**
 * A message with its gRPC prefix, as GrpcCall.write sends it. Replies built ahead of time (per
 * token, per kind) are framed then, once.
 */
export function grpcMessage(payload: Buffer): Buffer {
  const out = Buffer.allocUnsafe(PREFIX_BYTES + payload.length);
  out[0] = 0;
  out.writeUInt32BE(payload.length, 1);
  payload.copy(out, PREFIX_BYTES);
  return out;
}

/** grpc-message: percent-encoded UTF-8, printable ASCII kept (gRPC over HTTP/2, "Responses"). */
function percentEncode(text: string): string {
  let out = '';
  for (const byte of Buffer.from(text, 'utf8')) {
    out += byte >= 0x20 && byte <= 0x7e && byte !== 0x25 ? String.fromCharCode(byte) : `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

/** grpc-js's answer to a call that is not gRPC: 415, as its own server does. */
export function refuseNotGrpc(stream: ServerHttp2Stream): void {
  if (stream.destroyed || stream.closed) return;
  stream.respond({ ':status': http2Constants.HTTP_STATUS_UNSUPPORTED_MEDIA_TYPE }, { endStream: true });
  // Our side is done: do not wait for the client's (it is counted nowhere and never swept).
  stream.close(http2Constants.NGHTTP2_NO_ERROR);
}
