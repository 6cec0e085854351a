// The ext_proc wire format: the trimmed protos in proto/, loaded once, plus a codec for the hot
// path. Replies are encoded once (per token, or once at start for constant replies) and written
// as bytes; requests are only peeked at for which oneof they carry, and searched in their raw
// bytes for what could change the answer (a removed query parameter in `:path`, another
// spelling of a removed header's name): only a hit pays for more.
import { fileURLToPath } from 'node:url';
import type { ServiceDefinition } from '@grpc/grpc-js';
import { loadSync, type MethodDefinition } from '@grpc/proto-loader';
import protobuf from 'protobufjs';
import type { HeaderNamePolicy } from './policy/header-names.ts';
import type { ByteString } from './policy/query-names.ts';

export const PROTO_DIR = fileURLToPath(new URL('../proto/', import.meta.url));
export const PROTO_FILE = 'envoy/service/ext_proc/v3/external_processor.proto';
export const SERVICE_NAME = 'envoy.service.ext_proc.v3.ExternalProcessor';
export const PROCESS_PATH = `/${SERVICE_NAME}/Process`;

/** The oneof `request` of ProcessingRequest, by field number. */
const REQUEST_KINDS = {
  2: 'request_headers',
  3: 'response_headers',
  4: 'request_body',
  5: 'response_body',
  6: 'request_trailers',
  7: 'response_trailers',
} as const;
const OBSERVABILITY_MODE_FIELD = 10;

export type RequestKind = (typeof REQUEST_KINDS)[keyof typeof REQUEST_KINDS];
export const REQUEST_KIND_NAMES: readonly RequestKind[] = Object.values(REQUEST_KINDS);

/** What the handler needs from a ProcessingRequest; `bytes` allows a full decode when debugging. */
export interface PeekedRequest {
  readonly kind: RequestKind | undefined;
  readonly observabilityMode: boolean;
  readonly bytes: Buffer;
}

/** A reply already encoded; the codec writes it as is. */
export type EncodedReply = Buffer;

export const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: false, oneofs: true } as const;

const packageDefinition = loadSync(PROTO_FILE, { ...LOADER_OPTIONS, includeDirs: [PROTO_DIR] });
const processMethod = (packageDefinition[SERVICE_NAME] as Record<string, MethodDefinition<object, object>>).Process!;

/** Encodes a ProcessingResponse given as a plain object (proto-loader's own serializer). */
export function encodeResponse(response: object): EncodedReply {
  return processMethod.responseSerialize(response);
}

/** Fully decodes a ProcessingRequest (used off the hot path: debug logging, tests). */
export function decodeRequest(bytes: Buffer): Record<string, any> {
  return processMethod.requestDeserialize(bytes) as Record<string, any>;
}

/**
 * Reads only the top-level field tags of a ProcessingRequest. Throws on malformed input, which
 * grpc-js turns into an error status for the stream (never a clean close).
 */
export function peekRequest(bytes: Buffer): PeekedRequest {
  const reader = protobuf.Reader.create(bytes);
  let kind: RequestKind | undefined;
  let observabilityMode = false;
  while (reader.pos < reader.len) {
    const tag = reader.uint32();
    const field = tag >>> 3;
    const wireType = tag & 7;
    if (field === OBSERVABILITY_MODE_FIELD && wireType === 0) {
      observabilityMode = reader.bool();
      continue;
    }
    const k = REQUEST_KINDS[field as keyof typeof REQUEST_KINDS];
    // In a oneof the last field on the wire wins (protobuf encoding spec, "Oneofs").
    if (k !== undefined && wireType === 2) kind = k;
    reader.skipType(wireType);
  }
  return { kind, observabilityMode, bytes };
}

/** A HeaderValue's `key` field holding ":path": tag 1 (length-delimited), length 5, the bytes. */
const PATH_KEY = Buffer.from([0x0a, 0x05, ...Buffer.from(':path', 'latin1')]);
const VALUE_TAG = 0x12; // HeaderValue.value (string)
const RAW_VALUE_TAG = 0x1a; // HeaderValue.raw_value (bytes)

/**
 * The `:path` value of a request_headers message, read straight from its bytes without decoding
 * the rest: `raw_value` if set, else `value` (Envoy ≥1.27 sends raw_value only). It comes back as
 * a byte string (latin1: one char per byte), since a path is bytes and may hold any above 0x7F,
 * valid UTF-8 or not. Undefined when the bytes are not laid out as expected or name `:path` more
 * than once (a header value cannot hold the 0x0a byte, but metadata in the message could): the
 * caller then decodes the message.
 */
export function findPath(bytes: Buffer): ByteString | undefined {
  const at = bytes.indexOf(PATH_KEY);
  if (at < 0 || bytes.indexOf(PATH_KEY, at + 1) >= 0) return undefined;
  let pos = at + PATH_KEY.length;
  let value: Buffer | undefined;
  let raw: Buffer | undefined;
  // The HeaderValue's other fields follow its key; the next header starts with tag 0x0a again.
  while (pos < bytes.length && (bytes[pos] === VALUE_TAG || bytes[pos] === RAW_VALUE_TAG)) {
    const tag = bytes[pos++]!;
    let length = 0;
    for (let shift = 0; ; shift += 7) {
      if (pos >= bytes.length || shift > 28) return undefined;
      const b = bytes[pos++]!;
      length |= (b & 0x7f) << shift;
      if (b < 0x80) break;
    }
    if (length < 0 || pos + length > bytes.length) return undefined;
    const field = bytes.subarray(pos, pos + length);
    if (tag === VALUE_TAG) value = field;
    else raw = field;
    pos += length;
  }
  const chosen = raw !== undefined && raw.length > 0 ? raw : value;
  return chosen === undefined ? undefined : chosen.toString('latin1');
}

/**
 * Finds, in the raw bytes of a ProcessingRequest, header keys that are other spellings of the
 * names a HeaderNamePolicy removes (`ocp_apim_subscription_key` for `ocp-apim-subscription-key`).
 * Every key is on the wire as tag 0x0a, its length, its bytes, wherever the HeaderValue sits, so a
 * search for each name's anchor finds every candidate without decoding the message; Envoy sends
 * keys lower-cased (HTTP/2 requires it, its HTTP/1 codec lower-cases them). A hit elsewhere (in
 * metadata) only adds a harmless removal. Almost every request pays one indexOf per name with a
 * `-` in it.
 */
export class HeaderSpellingScanner {
  private readonly names: ReadonlyArray<{ needle: Buffer; needleAt: number; prefix: Buffer; key: Buffer; exact: Buffer }>;

  constructor(policy: HeaderNamePolicy) {
    this.names = policy.spelled.map((s) => {
      const key = Buffer.from(s.key, 'latin1');
      const prefix = Buffer.from([KEY_TAG, ...varint(key.length)]);
      // A name without a letter run (all dashes) is found by its tag and length instead.
      return s.anchor === ''
        ? { needle: prefix, needleAt: -prefix.length, prefix, key, exact: Buffer.from(s.name, 'latin1') }
        : { needle: Buffer.from(s.anchor, 'latin1'), needleAt: s.anchorAt, prefix, key, exact: Buffer.from(s.name, 'latin1') };
    });
  }

  /** The other spellings the message carries as header keys, or undefined when there are none. */
  find(bytes: Buffer): string[] | undefined {
    let found: string[] | undefined;
    for (const n of this.names) {
      for (let at = bytes.indexOf(n.needle); at >= 0; at = bytes.indexOf(n.needle, at + 1)) {
        const start = at - n.needleAt;
        if (start < n.prefix.length || start + n.key.length > bytes.length) continue;
        if (bytes.compare(n.prefix, 0, n.prefix.length, start - n.prefix.length, start) !== 0) continue;
        if (!spells(bytes, start, n.key)) continue;
        if (bytes.compare(n.exact, 0, n.exact.length, start, start + n.key.length) === 0) continue;
        const spelling = bytes.toString('latin1', start, start + n.key.length).toLowerCase();
        found ??= [];
        if (!found.includes(spelling)) found.push(spelling);
      }
    }
    return found;
  }
}

const KEY_TAG = 0x0a; // HeaderValue.key (string)

/** bytes[start…] spells key, ASCII case aside, with `_` and `-` read alike. */
function spells(bytes: Buffer, start: number, key: Buffer): boolean {
  for (let i = 0; i < key.length; i++) {
    let b = bytes[start + i]!;
    if (b >= 0x41 && b <= 0x5a) b += 0x20;
    else if (b === 0x5f) b = 0x2d;
    if (b !== key[i]) return false;
  }
  return true;
}

function varint(n: number): number[] {
  const out: number[] = [];
  while (n >= 0x80) {
    out.push((n & 0x7f) | 0x80);
    n >>>= 7;
  }
  out.push(n);
  return out;
}

/**
 * The ExternalProcessor service with the fast codec: requests are peeked, replies are bytes
 * already encoded by encodeResponse().
 */
export const extProcService: ServiceDefinition = {
  Process: {
    path: PROCESS_PATH,
    requestStream: true,
    responseStream: true,
    originalName: 'process',
    requestSerialize: (value: object) => processMethod.requestSerialize(value),
    requestDeserialize: peekRequest,
    responseSerialize: (value: EncodedReply) => value,
    responseDeserialize: (bytes: Buffer) => processMethod.responseDeserialize(bytes),
  },
};
