// The Envoy stand-in: a grpc-js client built from the canonical Envoy protos shipped in
// @grpc/grpc-js-xds (not from this project's trimmed copies), so the tests speak real Envoy.
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { loadSync, type PackageDefinition } from '@grpc/proto-loader';

const require = createRequire(import.meta.url);
export const UPSTREAM_DEPS = join(dirname(require.resolve('@grpc/grpc-js-xds/package.json')), 'deps');
export const UPSTREAM_INCLUDE_DIRS = ['envoy-api', 'xds', 'googleapis', 'protoc-gen-validate'].map((d) => join(UPSTREAM_DEPS, d));
const SERVICE = 'envoy.service.ext_proc.v3.ExternalProcessor';

let cached: PackageDefinition | undefined;
export function upstreamDefinition(): PackageDefinition {
  cached ??= loadSync('envoy/service/ext_proc/v3/external_processor.proto', {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: false,
    oneofs: true,
    includeDirs: UPSTREAM_INCLUDE_DIRS,
  });
  return cached;
}

export function upstreamMethod(): grpc.MethodDefinition<object, Record<string, any>> {
  return (upstreamDefinition()[SERVICE] as Record<string, grpc.MethodDefinition<object, Record<string, any>>>).Process!;
}

export interface Header {
  key: string;
  raw_value?: Buffer;
  value?: string;
}

/** A request_headers message as Envoy ≥1.27 sends it (values in raw_value). */
export function requestHeaders(headers: Record<string, string> | Array<[string, string]>, endOfStream = true): object {
  const list = Array.isArray(headers) ? headers : Object.entries(headers);
  return {
    request_headers: {
      headers: { headers: list.map(([key, value]) => ({ key, raw_value: Buffer.from(value, 'utf8') })) },
      end_of_stream: endOfStream,
    },
  };
}

export const TYPICAL_HEADERS: Array<[string, string]> = [
  [':authority', 'orders.example.com'],
  [':path', '/orders/42?expand=lines'],
  [':method', 'GET'],
  [':scheme', 'https'],
  ['user-agent', 'curl/8.5.0'],
  ['accept', '*/*'],
  ['x-forwarded-proto', 'https'],
  ['x-request-id', '6f1c1f8e-3a55-4a53-9d2e-5b1b6bbdc5b1'],
  ['authorization', 'Bearer forged-by-the-caller'],
  ['ocp-apim-subscription-key', '0123456789abcdef0123456789abcdef'],
];

export class ExtProcClient {
  private readonly client: grpc.Client;
  private readonly method = upstreamMethod();

  constructor(address: string, options: grpc.ChannelOptions = {}) {
    const Ctor = grpc.makeGenericClientConstructor({ Process: this.method } as grpc.ServiceDefinition, 'ExternalProcessor');
    this.client = new Ctor(address, grpc.credentials.createInsecure(), { 'grpc.enable_channelz': 0, ...options });
  }

  /** Opens a stream (one HTTP request, as Envoy does). */
  open(profile?: string): grpc.ClientDuplexStream<object, Record<string, any>> {
    const metadata = new grpc.Metadata();
    if (profile !== undefined) metadata.set('x-oauth2-profile', profile);
    return (this.client as any).Process(metadata) as grpc.ClientDuplexStream<object, Record<string, any>>;
  }

  /**
   * Sends one message and resolves with the first reply. `then`: what to do afterwards —
   * 'cancel' resets the stream the way Envoy does, 'half-close' ends our side and waits for the
   * server's status, 'none' leaves the stream open.
   */
  async exchange(message: object, options: { profile?: string; then?: 'cancel' | 'half-close' | 'none' } = {}): Promise<{ reply: Record<string, any>; status?: grpc.StatusObject }> {
    const call = this.open(options.profile);
    const then = options.then ?? 'half-close';
    return new Promise((resolve, reject) => {
      let reply: Record<string, any> | undefined;
      call.on('error', (err: grpc.ServiceError) => {
        if (then === 'cancel' && err.code === grpc.status.CANCELLED && reply !== undefined) return;
        reject(err);
      });
      call.on('status', (status: grpc.StatusObject) => {
        if (then === 'half-close' && reply !== undefined) resolve({ reply, status });
      });
      call.on('data', (data: Record<string, any>) => {
        if (reply !== undefined) return reject(new Error(`a second reply on one message: ${JSON.stringify(data)}`));
        reply = data;
        if (then === 'cancel') {
          call.cancel();
          resolve({ reply });
        } else if (then === 'none') {
          resolve({ reply });
        } else {
          call.end();
        }
      });
      call.write(message);
    });
  }

  close(): void {
    this.client.close();
  }
}

/** The set_headers of a request_headers reply as { name: value } (value from raw_value). */
export function setHeaders(reply: Record<string, any>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const option of reply.request_headers?.response?.header_mutation?.set_headers ?? []) {
    out[option.header.key] = Buffer.from(option.header.raw_value ?? []).toString('utf8');
  }
  return out;
}
