// The ext_proc wire format: the trimmed protos in proto/, loaded once, plus a codec for the hot
// path. Replies are encoded once (per token, or once at start for constant replies) and written
// as bytes; requests are only peeked at for which oneof they carry, because the answer to
// `request_headers` does not depend on the headers' values.
import { fileURLToPath } from 'node:url';
import type { ServiceDefinition } from '@grpc/grpc-js';
import { loadSync, type MethodDefinition } from '@grpc/proto-loader';
import protobuf from 'protobufjs';

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
 * the rest: `raw_value` if set, else `value` (Envoy ≥1.27 sends raw_value only). Undefined when
 * the bytes are not laid out as expected or name `:path` more than once (a header value cannot
 * hold the 0x0a byte, but metadata in the message could): the caller then decodes the message.
 */
export function findPath(bytes: Buffer): string | undefined {
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
  return chosen === undefined ? undefined : chosen.toString('utf8');
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
