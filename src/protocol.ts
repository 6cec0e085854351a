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
