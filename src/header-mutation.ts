// Pure: a profile and a token in, a ProcessingResponse out. No I/O, no clock.
//
// Envoy facts this file encodes (see ../shared/research/extproc-protocol.md §2):
// - Values go in `raw_value` only, as bytes. Envoy 1.27–1.31 reject a mutation with both
//   `value` and `raw_value` set; ≥1.32 ignores `value`. protobufjs would read a JS string in a
//   bytes field as base64, so values are Buffers.
// - ext_proc honours only the deprecated `append` flag (unset = overwrite) and ignores
//   `append_action`; `append` stays unset and `append_action` says OVERWRITE_IF_EXISTS_OR_ADD
//   for Envoys that do read it.
import type { ProfileConfig } from './config.ts';
import { denyReasons, type DenyReason } from './errors.ts';
import type { Token } from './token.ts';

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
 * `request_headers` answer: set the token header, remove the subscription key and extras, and
 * when `path` is given (a query parameter had to go), set `:path` to it.
 */
export function injectToken(profile: ProfileConfig, token: Token, path?: string): ProcessingResponse {
  const set = [setHeader(profile.header, `${token.tokenType} ${token.accessToken}`)];
  if (path !== undefined) set.push(setHeader(':path', path));
  return {
    request_headers: {
      response: { header_mutation: { set_headers: set, remove_headers: [...profile.removeHeaders] } },
    },
  };
}

/**
 * `onFailure: allow` without a token: the request goes on without credentials. The client's own
 * value of the token header is removed too, so it can never reach the backend as if it were ours.
 */
export function continueWithoutToken(profile: ProfileConfig, path?: string): ProcessingResponse {
  const mutation: HeaderMutation = { remove_headers: [profile.header, ...profile.removeHeaders] };
  if (path !== undefined) mutation.set_headers = [setHeader(':path', path)];
  return { request_headers: { response: { header_mutation: mutation } } };
}

/**
 * The request path without the named query parameters, or undefined when none is there. Names
 * match as sent or percent-decoded, in any case (backends such as ASP.NET read query names
 * without regard to case). The other parameters keep their order and encoding byte for byte.
 */
export function stripQueryParameters(path: string, names: readonly string[]): string | undefined {
  const q = path.indexOf('?');
  if (q < 0 || names.length === 0) return undefined;
  const wanted = names.map((n) => n.toLowerCase());
  const kept: string[] = [];
  let removed = false;
  for (const pair of path.slice(q + 1).split('&')) {
    const rawName = (pair.split('=', 1)[0] ?? '').toLowerCase();
    if (wanted.includes(rawName) || wanted.includes(safeDecode(rawName).toLowerCase())) removed = true;
    else kept.push(pair);
  }
  if (!removed) return undefined;
  const rest = kept.filter((p) => p !== '');
  return rest.length === 0 ? path.slice(0, q) : `${path.slice(0, q)}?${rest.join('&')}`;
}

function safeDecode(s: string): string {
  try {
    return decodeURIComponent(s.replace(/\+/g, ' '));
  } catch {
    return s;
  }
}

/** A local reply from Envoy: JSON body with a stable code, never a secret. */
export function deny(status: number, reason: DenyReason, profileName: string): ProcessingResponse {
  const { code, message } = denyReasons[reason];
  const body = JSON.stringify({ error: code, message, profile: profileName });
  return {
    immediate_response: {
      // Envoy turns a missing status or one below 200 into 200: always set it.
      status: { code: status },
      headers: {
        set_headers: [setHeader('content-type', 'application/json'), setHeader('cache-control', 'no-store')],
      },
      body: Buffer.from(body, 'utf8'),
      // Shown by Envoy as %RESPONSE_CODE_DETAILS%; it replaces whitespace, so none is used.
      details: `oauth2_extproc_${code.toLowerCase()}`,
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
