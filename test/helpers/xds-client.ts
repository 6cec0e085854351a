// Envoy stand-ins for the SDS and ext_authz services: grpc-js clients built from the canonical
// Envoy protos in @grpc/grpc-js-xds (not from this project's trimmed copies), plus decoders for
// what travels inside a google.protobuf.Any.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import protobuf from 'protobufjs';
import { UPSTREAM_INCLUDE_DIRS } from './extproc-client.ts';

export const UPSTREAM_LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: false, oneofs: true } as const;

type Methods = Record<string, grpc.MethodDefinition<object, Record<string, any>>>;

export function upstreamService(file: string, service: string): Methods {
  const definition = loadSync(file, { ...UPSTREAM_LOADER_OPTIONS, includeDirs: UPSTREAM_INCLUDE_DIRS });
  return definition[service] as Methods;
}

export function upstreamClient(file: string, service: string, address: string): grpc.Client & Record<string, any> {
  const Ctor = grpc.makeGenericClientConstructor(upstreamService(file, service) as grpc.ServiceDefinition, service);
  return new Ctor(address, grpc.credentials.createInsecure(), { 'grpc.enable_channelz': 0 }) as grpc.Client & Record<string, any>;
}

const root = new protobuf.Root();
root.resolvePath = (_origin, target) => {
  for (const dir of UPSTREAM_INCLUDE_DIRS) if (existsSync(join(dir, target))) return join(dir, target);
  return target;
};
root.loadSync('envoy/extensions/transport_sockets/tls/v3/secret.proto', { keepCase: true });

/** An upstream-encoded Secret (in an Any), decoded with Envoy's own definition. */
export function decodeSecret(any: { type_url: string; value: Buffer | Uint8Array }): { name: string; value: string; typeUrl: string } {
  const type = root.lookupType('envoy.extensions.transport_sockets.tls.v3.Secret');
  const secret = type.toObject(type.decode(any.value), { bytes: Buffer, oneofs: true }) as any;
  const source = secret.generic_secret?.secret ?? {};
  const value = source.inline_bytes !== undefined ? Buffer.from(source.inline_bytes).toString('utf8') : source.inline_string ?? '';
  return { name: secret.name, value, typeUrl: any.type_url };
}

/** The upstream Secret type, to encode one the way a canonical server would. */
export function upstreamSecretType(): protobuf.Type {
  return root.lookupType('envoy.extensions.transport_sockets.tls.v3.Secret');
}

/** A duplex stream whose replies are read one at a time. */
export class Replies<T> {
  private readonly queue: T[] = [];
  private readonly waiting: Array<{ resolve: (value: T) => void; reject: (err: Error) => void }> = [];
  error: Error | undefined;

  constructor(call: grpc.ClientDuplexStream<object, T>) {
    call.on('data', (data: T) => {
      const waiter = this.waiting.shift();
      if (waiter) waiter.resolve(data);
      else this.queue.push(data);
    });
    call.on('error', (err: Error) => {
      this.error = err;
      for (const waiter of this.waiting.splice(0)) waiter.reject(err);
    });
  }

  /** The next reply, or a rejection after timeoutMs. */
  next(timeoutMs = 5000): Promise<T> {
    const ready = this.queue.shift();
    if (ready !== undefined) return Promise.resolve(ready);
    if (this.error) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      const waiter = {
        resolve: (value: T) => { clearTimeout(timer); resolve(value); },
        reject: (err: Error) => { clearTimeout(timer); reject(err); },
      };
      const timer = setTimeout(() => {
        this.waiting.splice(this.waiting.indexOf(waiter), 1);
        reject(new Error(`no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiting.push(waiter);
    });
  }

  /** True when nothing more arrives within ms (a reply that must not come). */
  async none(ms = 300): Promise<boolean> {
    try {
      const extra = await this.next(ms);
      this.queue.unshift(extra);
      return false;
    } catch {
      return this.queue.length === 0;
    }
  }
}
