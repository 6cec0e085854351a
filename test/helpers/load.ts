// Envoy-shaped stream churn: many ext_proc streams on one HTTP/2 connection, each reset by the
// client (RST_STREAM) as soon as its reply arrives, the way Envoy ends ext_proc streams.
import * as grpc from '@grpc/grpc-js';
import { ExtProcClient, requestHeaders, TYPICAL_HEADERS } from './extproc-client.ts';

export interface ChurnResult {
  replies: number;
  /** Streams that failed before their reply, by gRPC status code and details. */
  failures: Record<string, number>;
  failed: number;
  replyKinds: Record<string, number>;
}

export async function churn(address: string, options: { streams: number; concurrency: number; profile?: string }): Promise<ChurnResult> {
  const client = new ExtProcClient(address);
  const message = requestHeaders(TYPICAL_HEADERS);
  const result: ChurnResult = { replies: 0, failures: {}, failed: 0, replyKinds: {} };
  let started = 0;

  const one = (): Promise<void> => new Promise((resolve) => {
    const call = client.open(options.profile);
    let answered = false;
    call.on('data', (reply: Record<string, any>) => {
      answered = true;
      result.replies++;
      result.replyKinds[reply.response] = (result.replyKinds[reply.response] ?? 0) + 1;
      call.cancel();
      resolve();
    });
    call.on('error', (err: grpc.ServiceError) => {
      if (answered) return; // our own cancel
      const key = `${grpc.status[err.code]}: ${err.details}`;
      result.failures[key] = (result.failures[key] ?? 0) + 1;
      result.failed++;
      resolve();
    });
    call.write(message);
  });

  const worker = async (): Promise<void> => {
    while (started < options.streams) {
      started++;
      await one();
    }
  };
  await Promise.all(Array.from({ length: options.concurrency }, worker));
  client.close();
  return result;
}
