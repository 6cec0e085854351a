// Loading the trimmed protos in proto/ for the adapters that use grpc-js's own codec (SDS and
// ext_authz answer one message per token change or per check, so proto-loader's serializers are
// fast enough), plus protobufjs types for messages packed into a google.protobuf.Any.
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ServiceDefinition } from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import protobuf from 'protobufjs';

/** The trimmed protos (proto/ at the package root, from src/protocols/ or dist/protocols/). */
export const PROTO_DIR = fileURLToPath(new URL('../../proto/', import.meta.url));
/** proto-loader's options for every service here: field names as in the protos, enums by name. */
export const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: false, oneofs: true } as const;

export function loadService(file: string, service: string): ServiceDefinition {
  const definition = loadSync(file, { ...LOADER_OPTIONS, includeDirs: [PROTO_DIR] });
  return definition[service] as ServiceDefinition;
}

const root = new protobuf.Root();
// Imports are relative to proto/ (google/protobuf/* comes bundled with protobufjs).
root.resolvePath = (_origin, target) => join(PROTO_DIR, target);

/** A message type from proto/, e.g. `envoy.extensions.transport_sockets.tls.v3.Secret`. */
export function messageType(file: string, name: string): protobuf.Type {
  if (!root.files.includes(join(PROTO_DIR, file))) root.loadSync(file, { keepCase: true });
  return root.lookupType(name);
}

/** google.protobuf.Any as proto-loader reads and writes it. */
export interface AnyMessage {
  type_url: string;
  value: Buffer;
}

export function packAny(type: protobuf.Type, message: object): AnyMessage {
  return { type_url: `type.googleapis.com/${type.fullName.slice(1)}`, value: Buffer.from(type.encode(type.fromObject(message)).finish()) };
}
