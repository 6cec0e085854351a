// The ext_authz wire format for the hot path: a CheckRequest is read only for what the answer
// depends on (the profile's context extension, the request's header names and its path), and
// answers are bytes, the common ones encoded once per token. Field numbers are those of
// proto/envoy/service/auth/v3/*.proto (test/proto-compat.test.ts holds the two together).
import type { ServiceDefinition } from '@grpc/grpc-js';
import type { MethodDefinition } from '@grpc/proto-loader';
import protobuf from 'protobufjs';
import { loadService } from './wire.ts';

const AUTHZ = loadService('envoy/service/auth/v3/external_auth.proto', 'envoy.service.auth.v3.Authorization');
const check = AUTHZ.Check as unknown as MethodDefinition<object, object>;

/** What the Check answer needs from a CheckRequest. */
export interface PeekedCheck {
  /** context_extensions entries (only the few Envoy is configured to send). */
  readonly extensions: ReadonlyMap<string, string>;
  /** Names of the request's headers, as Envoy sent them (lower case). */
  readonly headerNames: readonly string[];
  /** `:path`, query included. */
  readonly path: string;
}

const LEN = 2;

/** Calls `visit` for each length-delimited field of the message in [start, end). */
function fields(reader: protobuf.Reader, end: number, visit: (field: number, end: number) => void): void {
  while (reader.pos < end) {
    const tag = reader.uint32();
    const wireType = tag & 7;
    if (wireType !== LEN) {
      reader.skipType(wireType);
      continue;
    }
    const length = reader.uint32();
    const fieldEnd = reader.pos + length;
    if (fieldEnd > end) throw new RangeError('a field runs past the end of its message');
    visit(tag >>> 3, fieldEnd);
    reader.pos = fieldEnd;
  }
}

/** A map entry or HeaderValue: string fields 1 (key) and 2 (value). */
function pair(reader: protobuf.Reader, end: number): [string, string] {
  let key = '';
  let value = '';
  fields(reader, end, (field, fieldEnd) => {
    if (field === 1) key = readString(reader, fieldEnd);
    else if (field === 2) value = readString(reader, fieldEnd);
  });
  return [key, value];
}

function readString(reader: protobuf.Reader, end: number): string {
  return protobuf.util.utf8.read(reader.buf, reader.pos, end);
}

/**
 * Reads CheckRequest.attributes (1): request (4) → http (2) → headers (3, map) or header_map
 * (13), path (4); context_extensions (10, map). Everything else is skipped unread. Throws on
 * malformed input, which grpc-js turns into an error status (Envoy then denies).
 */
export function peekCheck(bytes: Buffer): PeekedCheck {
  const reader = protobuf.Reader.create(bytes);
  const extensions = new Map<string, string>();
  const headerNames: string[] = [];
  let path = '';
  fields(reader, bytes.length, (field, end) => {
    if (field !== 1) return;
    fields(reader, end, (attr, attrEnd) => {
      if (attr === 10) {
        const [key, value] = pair(reader, attrEnd);
        extensions.set(key, value);
      } else if (attr === 4) {
        fields(reader, attrEnd, (req, reqEnd) => {
          if (req !== 2) return;
          fields(reader, reqEnd, (http, httpEnd) => {
            if (http === 3) headerNames.push(pair(reader, httpEnd)[0]);
            else if (http === 4) path = readString(reader, httpEnd);
            else if (http === 13) fields(reader, httpEnd, (h, hEnd) => { if (h === 1) headerNames.push(pair(reader, hEnd)[0]); });
          });
        });
      }
    });
  });
  return { extensions, headerNames, path };
}

/** Encodes a CheckResponse given as a plain object (proto-loader's serializer). */
export function encodeCheckResponse(response: object): Buffer {
  return check.responseSerialize(response);
}

/** The Authorization service with the fast codec: requests peeked, replies written as bytes. */
export const authzService: ServiceDefinition = {
  Check: {
    path: check.path,
    requestStream: false,
    responseStream: false,
    originalName: 'check',
    requestSerialize: (value: object) => check.requestSerialize(value),
    requestDeserialize: peekCheck,
    responseSerialize: (value: Buffer) => value,
    responseDeserialize: (bytes: Buffer) => check.responseDeserialize(bytes),
  },
};
