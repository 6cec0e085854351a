// The ext_proc wire format: the trimmed protos in proto/, loaded once, plus a codec for the hot
// path. Replies are encoded once (per token, or once at start for constant replies) and written
// as bytes; requests are only peeked at for which oneof they carry, and searched in their raw
// bytes for what could change the answer (a removed query parameter in `:path`, another
// spelling of a removed header's name): only a hit pays for more.
import { loadSync, type MethodDefinition } from '@grpc/proto-loader';
import protobuf from 'protobufjs';
import type { HeaderNamePolicy } from '../policy/header-names.ts';
import type { ByteString } from '../policy/query-names.ts';
import { LOADER_OPTIONS, PROTO_DIR } from './wire.ts';

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
const PATH_KEY = '\x0a\x05:path';
const VALUE_TAG = 0x12; // HeaderValue.value (string)
const RAW_VALUE_TAG = 0x1a; // HeaderValue.raw_value (bytes)

/**
 * A message's bytes as a byte string (latin1: one char per byte), for the searches below: one
 * conversion, then string searches, costs less than the same searches on the Buffer.
 */
export function messageText(bytes: Buffer): ByteString {
  return bytes.toString('latin1');
}

/**
 * The `:path` value of a request_headers message, read straight from its bytes without decoding
 * the rest: `raw_value` if set, else `value` (Envoy ≥1.27 sends raw_value only). It comes back as
 * a byte string, since a path is bytes and may hold any above 0x7F, valid UTF-8 or not.
 * Undefined when the bytes are not laid out as expected or name `:path` more than once (a header
 * value cannot hold the 0x0a byte, but metadata in the message could): the caller then decodes
 * the message.
 */
export function findPath(message: Buffer | ByteString): ByteString | undefined {
  const text = typeof message === 'string' ? message : messageText(message);
  const at = text.indexOf(PATH_KEY);
  if (at < 0 || text.indexOf(PATH_KEY, at + 1) >= 0) return undefined;
  let pos = at + PATH_KEY.length;
  let value: ByteString | undefined;
  let raw: ByteString | undefined;
  // The HeaderValue's other fields follow its key; the next header starts with tag 0x0a again.
  while (pos < text.length && (text.charCodeAt(pos) === VALUE_TAG || text.charCodeAt(pos) === RAW_VALUE_TAG)) {
    const tag = text.charCodeAt(pos++);
    let length = 0;
    for (let shift = 0; ; shift += 7) {
      if (pos >= text.length || shift > 28) return undefined;
      const b = text.charCodeAt(pos++);
      length |= (b & 0x7f) << shift;
      if (b < 0x80) break;
    }
    if (length < 0 || pos + length > text.length) return undefined;
    const field = text.slice(pos, pos + length);
    if (tag === VALUE_TAG) value = field;
    else raw = field;
    pos += length;
  }
  return raw !== undefined && raw.length > 0 ? raw : value;
}

/**
 * Finds, in the raw bytes of a ProcessingRequest, header keys that are other spellings of the
 * names a HeaderNamePolicy removes (`ocp_apim_subscription_key` for `ocp-apim-subscription-key`).
 * Every key is on the wire as tag 0x0a, its length, its bytes, wherever the HeaderValue sits, so
 * a search for each name's anchor (its longest stretch without `-`, the same in every spelling)
 * finds every candidate without decoding the message; Envoy sends keys lower-cased (HTTP/2
 * requires it, its HTTP/1 codec lower-cases them). A hit elsewhere (in metadata) only adds a
 * harmless removal. Almost every request pays one search per name with a `-` in it, and a
 * second one past the name itself.
 */
export class HeaderSpellingScanner {
  private readonly names: ReadonlyArray<{ anchor: string; anchorAt: number; prefix: string; key: string; exact: string }>;
  readonly empty: boolean;

  constructor(policy: HeaderNamePolicy) {
    this.names = policy.spelled.map((s) => {
      const prefix = String.fromCharCode(KEY_TAG, ...varint(s.key.length));
      // A name without a letter run (all dashes) is found by its tag and length instead.
      return s.anchor === ''
        ? { anchor: prefix, anchorAt: -prefix.length, prefix, key: s.key, exact: s.name }
        : { anchor: s.anchor, anchorAt: s.anchorAt, prefix, key: s.key, exact: s.name };
    });
    this.empty = this.names.length === 0;
  }

  /** The other spellings the message (messageText) carries as header keys, or undefined. */
  find(text: ByteString): string[] | undefined {
    let found: string[] | undefined;
    for (const n of this.names) {
      for (let at = text.indexOf(n.anchor); at >= 0; at = text.indexOf(n.anchor, at + 1)) {
        const start = at - n.anchorAt;
        if (start < n.prefix.length || start + n.key.length > text.length) continue;
        if (!text.startsWith(n.prefix, start - n.prefix.length) || !spells(text, start, n.key)) continue;
        if (text.startsWith(n.exact, start)) continue;
        const spelling = text.slice(start, start + n.key.length).toLowerCase();
        found ??= [];
        if (!found.includes(spelling)) found.push(spelling);
      }
    }
    return found;
  }
}

const KEY_TAG = 0x0a; // HeaderValue.key (string)

/** text[start…] spells key, ASCII case aside, with `_` and `-` read alike. */
function spells(text: ByteString, start: number, key: string): boolean {
  for (let i = 0; i < key.length; i++) {
    let b = text.charCodeAt(start + i);
    if (b >= 0x41 && b <= 0x5a) b += 0x20;
    else if (b === 0x5f) b = 0x2d;
    if (b !== key.charCodeAt(i)) return false;
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
