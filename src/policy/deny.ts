// What a request is told when it cannot have its credentials, whichever protocol carries the
// answer (ext_proc's immediate_response, ext_authz's denied_response): the HTTP status, a JSON
// body with a stable code, and the details Envoy logs. Pure; never a secret in it.
import { denyReasons, type DenyReason } from '../errors.ts';

export interface DenyAnswer {
  readonly status: number;
  readonly headers: ReadonlyArray<readonly [name: string, value: string]>;
  readonly body: string;
  /** Shown by Envoy as %RESPONSE_CODE_DETAILS%; it replaces whitespace, so none is used. */
  readonly details: string;
}

export function denyAnswer(status: number, reason: DenyReason, profileName: string): DenyAnswer {
  const { code, message } = denyReasons[reason];
  return {
    status,
    headers: [['content-type', 'application/json'], ['cache-control', 'no-store']],
    body: JSON.stringify({ error: code, message, profile: profileName }),
    details: `oauth2_extproc_${code.toLowerCase()}`,
  };
}
