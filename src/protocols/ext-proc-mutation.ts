// Pure: a profile and a token in, a ProcessingResponse out. No I/O, no clock.
//
// Envoy facts this file encodes (see ../shared/research/extproc-protocol.md §2):
// - Values go in `raw_value` only, as bytes. Envoy 1.27–1.31 reject a mutation with both
//   `value` and `raw_value` set; ≥1.32 ignores `value`. protobufjs would read a JS string in a
//   bytes field as base64, so values are Buffers.
// - ext_proc honours only the deprecated `append` flag (unset = overwrite) and ignores
//   `append_action`; `append` stays unset and `append_action` says OVERWRITE_IF_EXISTS_OR_ADD
//   for Envoys that do read it.
import type { ProfileConfig } from '../config.ts';
import type { DenyReason } from '../errors.ts';
import { denyAnswer } from '../policy/deny.ts';
import type { ByteString } from '../policy/query-names.ts';
import { authorizationValue, type Token } from '../token.ts';

export interface HeaderValueOption {
  header: { key: string; raw_value: Buffer };
  append_action: 'OVERWRITE_IF_EXISTS_OR_ADD';
}

export interface HeaderMutation {
  set_headers?: HeaderValueOption[];
  remove_headers?: string[];
}

export type ProcessingResponse =
  | { request_headers: { response?: { header_mutation: HeaderMutation } } }
  | { response_headers: object }
  | { request_body: object }
  | { response_body: object }
  | { request_trailers: object }
  | { response_trailers: object }
  | { immediate_response: ImmediateResponse };

export interface ImmediateResponse {
  status: { code: number };
  headers: HeaderMutation;
  body: Buffer;
  details: string;
}

/**
 * What one request needs beyond the profile's prebuilt answer: `path`, its `:path` without the
 * removed query parameters (a byte string), and `removeHeaders`, other spellings of removed
 * header names that it carries.
 */
export interface RequestChanges {
  readonly path?: ByteString | undefined;
  readonly removeHeaders?: readonly string[] | undefined;
}

/**
 * `request_headers` answer: set the token header, remove the subscription key and extras, and
 * apply the request's own changes (a new `:path`, more headers to remove).
 */
export function injectToken(profile: ProfileConfig, token: Token, changes: RequestChanges = {}): ProcessingResponse {
  const set = [setHeader(profile.header, authorizationValue(token))];
  if (changes.path !== undefined) set.push(setPath(changes.path));
  return {
    request_headers: {
      response: { header_mutation: { set_headers: set, remove_headers: [...profile.removeHeaders, ...(changes.removeHeaders ?? [])] } },
    },
  };
}

/**
 * `onFailure: allow` without a token: the request goes on without credentials. The client's own
 * value of the token header is removed too, so it can never reach the backend as if it were ours.
 */
export function continueWithoutToken(profile: ProfileConfig, changes: RequestChanges = {}): ProcessingResponse {
  const mutation: HeaderMutation = { remove_headers: [profile.header, ...profile.removeHeaders, ...(changes.removeHeaders ?? [])] };
  if (changes.path !== undefined) mutation.set_headers = [setPath(changes.path)];
  return { request_headers: { response: { header_mutation: mutation } } };
}

/** A local reply from Envoy (src/policy/deny.ts): JSON body with a stable code, never a secret. */
export function deny(status: number, reason: DenyReason, profileName: string): ProcessingResponse {
  const answer = denyAnswer(status, reason, profileName);
  return {
    immediate_response: {
      // Envoy turns a missing status or one below 200 into 200: always set it.
      status: { code: answer.status },
      headers: { set_headers: answer.headers.map(([name, value]) => setHeader(name, value)) },
      body: Buffer.from(answer.body, 'utf8'),
      details: answer.details,
    },
  };
}

/** The empty answer of the same kind, for events the sidecar has nothing to do for. */
export function emptyReply(kind: Exclude<keyof ProcessingResponseKinds, 'immediate_response'>): ProcessingResponse {
  return { [kind]: {} } as ProcessingResponse;
}

type ProcessingResponseKinds = {
  request_headers: unknown;
  response_headers: unknown;
  request_body: unknown;
  response_body: unknown;
  request_trailers: unknown;
  response_trailers: unknown;
  immediate_response: unknown;
};

function setHeader(key: string, value: string): HeaderValueOption {
  return { header: { key, raw_value: Buffer.from(value, 'utf8') }, append_action: 'OVERWRITE_IF_EXISTS_OR_ADD' };
}

/** `:path` is bytes: written back exactly as read, whatever is above 0x7F. */
function setPath(path: ByteString): HeaderValueOption {
  return { header: { key: ':path', raw_value: Buffer.from(path, 'latin1') }, append_action: 'OVERWRITE_IF_EXISTS_OR_ADD' };
}
