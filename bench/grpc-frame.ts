// The request h2load sends to an ext_proc server: one gRPC message (5-byte length prefix, gRPC
// over HTTP/2 spec "Length-Prefixed-Message") holding a ProcessingRequest encoded with the
// canonical Envoy protos, as Envoy ≥1.27 sends it: ten headers in raw_value, among them the
// caller's subscription key and a forged authorization. Each h2load request is one HTTP/2
// stream: the message, then end of stream, i.e. one ext_proc stream of one request.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requestHeaders, TYPICAL_HEADERS, upstreamMethod } from '../test/helpers/extproc-client.ts';
import { grpcFrame } from '../test/helpers/grpc-attacks.ts';

export { PROCESS_PATH as EXT_PROC_PATH } from '../src/protocols/ext-proc-wire.ts';
export const GRPC_HEADERS = ['content-type: application/grpc', 'te: trailers'];

/** Writes the framed request_headers message into `dir`; returns the file and its size. */
export function writeRequestFrame(dir: string): { file: string; bytes: number } {
  const message = upstreamMethod().requestSerialize(requestHeaders(TYPICAL_HEADERS));
  const frame = grpcFrame(message);
  const file = join(dir, 'request-headers.grpc');
  writeFileSync(file, frame);
  return { file, bytes: frame.length };
}
