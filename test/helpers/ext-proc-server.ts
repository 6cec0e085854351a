// The ext_proc service as the sidecar serves it, on 127.0.0.1: the real GrpcListener (the
// hand-spoken Process path, grpc-js for the rest), without token caches of its own: tests give
// each profile the token provider they need.
import { GrpcListener, type ListenerOptions } from '../../src/grpc-listener.ts';
import type { ExtProcService } from '../../src/protocols/ext-proc.ts';

export interface ExtProcServer {
  address: string;
  listener: GrpcListener;
  service: ExtProcService;
  close(): void;
}

export async function serveExtProc(options: ListenerOptions): Promise<ExtProcServer> {
  // SDS, on the same port, wants change notifications: providers without them never change.
  const profiles = options.profiles.map(({ config, tokens }) => ({
    config,
    tokens: 'onChange' in tokens ? tokens : { current: () => tokens.current(), rejected: tokens.rejected?.bind(tokens), onChange: () => undefined },
  }));
  const listener = new GrpcListener({ ...options, profiles });
  listener.setServing(true);
  const address = await listener.bind('127.0.0.1:0');
  return { address, listener, service: listener.service, close: () => listener.forceShutdown() };
}
