#!/usr/bin/env node
// The baseline for "the sidecar alone": a grpc-js ext_proc server with no logic at all. Every
// message gets the same reply, encoded once at start with the same shape and size as the
// sidecar's (`authorization` set, `ocp-apim-subscription-key` removed); requests are not even
// decoded. Whatever the sidecar spends above this is the cost of its own code.
//
//   npx node bench/bare-server.ts [--listen 127.0.0.1:0] [--authorization-length N]
//
// Prints one JSON line `{"listening":"127.0.0.1:PORT"}` once bound; exits on SIGTERM/SIGINT.
import { parseArgs } from 'node:util';
import { Server, ServerCredentials, type ServerDuplexStream, type ServiceDefinition } from '@grpc/grpc-js';
import { encodeResponse, PROCESS_PATH } from '../src/protocols/ext-proc-wire.ts';

/** The reply: a request_headers answer with an `authorization` value of `length` bytes. */
export function constantReply(length: number): Buffer {
  const value = `Bearer ${'x'.repeat(Math.max(0, length - 'Bearer '.length))}`;
  return encodeResponse({
    request_headers: {
      response: {
        header_mutation: {
          set_headers: [{ header: { key: 'authorization', raw_value: Buffer.from(value, 'utf8') }, append_action: 'OVERWRITE_IF_EXISTS_OR_ADD' }],
          remove_headers: ['ocp-apim-subscription-key'],
        },
      },
    },
  });
}

export async function startBareServer(options: { listen?: string; authorizationLength?: number } = {}): Promise<{ address: string; server: Server }> {
  const reply = constantReply(options.authorizationLength ?? 1024);
  const identity = (b: Buffer): Buffer => b;
  const service: ServiceDefinition = {
    Process: {
      path: PROCESS_PATH,
      requestStream: true,
      responseStream: true,
      requestSerialize: identity,
      requestDeserialize: identity,
      responseSerialize: identity,
      responseDeserialize: identity,
    },
  };
  // The same grpc-js option the sidecar sets: channelz bookkeeping is not "logic".
  const server = new Server({ 'grpc.enable_channelz': 0 });
  server.addService(service, {
    Process: (call: ServerDuplexStream<Buffer, Buffer>) => {
      call.on('data', () => call.write(reply));
      call.on('end', () => call.end());
      call.on('error', () => {});
    },
  });
  const listen = options.listen ?? '127.0.0.1:0';
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(listen, ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
  });
  return { address: `${listen.slice(0, listen.lastIndexOf(':'))}:${port}`, server };
}

if (import.meta.main) {
  const { values } = parseArgs({ options: { listen: { type: 'string' }, 'authorization-length': { type: 'string' } } });
  const { address, server } = await startBareServer({
    listen: values.listen,
    authorizationLength: values['authorization-length'] === undefined ? undefined : Number(values['authorization-length']),
  });
  process.stdout.write(`${JSON.stringify({ listening: address })}\n`);
  const stop = (): void => server.tryShutdown(() => process.exit(0));
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}
