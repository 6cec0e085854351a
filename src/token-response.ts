// A token endpoint's answer turned into a Token or a coded TokenFetchError: the parsing and
// sanity rules of RFC 6749 §5.1/§5.2, with nothing of the HTTP exchange itself. Pure: the
// status, headers, body and the moment it arrived go in; a Token or an error comes out.
import { TokenEndpointError, TokenResponseError } from './errors.ts';
import { formEncode } from './form-encoding.ts';
import { decodeJwtParts } from './jwt-parts.ts';
import type { Token } from './token.ts';

/** A token response is a few KB; an answer larger than this is not one (and not read whole). */
export const MAX_BODY_BYTES = 1024 * 1024;
const MAX_OAUTH_ERROR_CHARS = 100;
const MAX_OAUTH_DESCRIPTION_CHARS = 500;

// RFC 7230 tchar: a token type goes into a header value as `<type> <token>`.
const HEADER_TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
// Visible ASCII. RFC 6750's b64token is stricter, but some IdPs issue opaque tokens outside it;
// what matters is that the header value carries no space, CR, LF, NUL or non-ASCII byte, which
// Envoy (and any HTTP/1 hop) would reject or split on.
const ACCESS_TOKEN = /^[\x21-\x7e]+$/;
const NUMERIC = /^\s*\d+(\.\d+)?\s*$/;
/**
 * The longest lifetime believed. Longer claims (1e13 s, or the "never expires" of some IdPs) are
 * read as a year: refusing them would make a usable token an outage, and a year is longer than
 * any client-credentials token the usual IdPs issue (Entra at most a day, Auth0 30 days), while
 * every moment derived from it stays far inside what Date and the timers handle.
 */
export const MAX_LIFETIME_SECONDS = 365 * 24 * 3600;

export interface Body {
  text: string;
  /** Bytes read (up to the cap). */
  bytes: number;
  truncated: boolean;
}

export async function readCapped(stream: AsyncIterable<Buffer>, limit: number): Promise<Body> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of stream) {
    if (size + chunk.length > limit) {
      chunks.push(chunk.subarray(0, limit - size));
      // Leaving the loop early destroys the stream; the caller's finally covers the rest.
      return { text: Buffer.concat(chunks).toString('utf8'), bytes: limit, truncated: true };
    }
    chunks.push(chunk);
    size += chunk.length;
  }
  return { text: Buffer.concat(chunks).toString('utf8'), bytes: size, truncated: false };
}

export type Headers = Record<string, string | string[] | undefined>;

/**
 * `secrets` (here and in parseTokenResponse): every raw value the request carried that must
 * never be repeated, as the request builder put it in: the client secret, the Basic pair
 * `formEncode(id):formEncode(secret)` or the whole `Basic …` value, a client assertion. Only
 * raw values: every encoding an echoing endpoint could send back is derived here (see
 * encodings()). Nothing of the body reaches an error but the endpoint's own `error` and
 * `error_description`, masked and truncated; any other body is described by its type and size.
 */
export function endpointError(status: number, headers: Headers, body: Body, now: number, secrets: readonly string[]): TokenEndpointError {
  // RFC 6585 §4 and RFC 9110 §10.2.3: Retry-After is meaningful on 429 and 503.
  const retryAfterSeconds = status === 429 || status === 503 ? parseRetryAfter(header(headers, 'retry-after'), now) : undefined;
  const json = body.truncated ? undefined : parseJson(body.text);
  if (isObject(json) && typeof json.error === 'string' && json.error !== '') {
    return new TokenEndpointError(status, {
      error: clean(json.error, MAX_OAUTH_ERROR_CHARS, secrets),
      errorDescription: typeof json.error_description === 'string'
        ? clean(json.error_description, MAX_OAUTH_DESCRIPTION_CHARS, secrets)
        : undefined,
      retryAfterSeconds,
    });
  }
  return new TokenEndpointError(status, { retryAfterSeconds, bodyShape: describeBody(headers, body, secrets) });
}

export function parseTokenResponse(status: number, headers: Headers, body: Body, now: number, secrets: readonly string[]): Token {
  // Never quote a 2xx body: it may hold a token in a shape we do not parse (e.g. form-encoded).
  const what = `HTTP ${status}, ${clean(header(headers, 'content-type') ?? 'no content-type', 60, secrets)}`;
  if (body.truncated) throw new TokenResponseError(`token response larger than ${MAX_BODY_BYTES} bytes (${what})`);
  const json = parseJson(body.text);
  if (json === undefined) throw new TokenResponseError(`token response is not JSON (${what})`);
  if (!isObject(json)) throw new TokenResponseError(`token response is not a JSON object (${what})`);

  if (json.error !== undefined && json.error !== null) {
    const oauthError = clean(String(json.error), MAX_OAUTH_ERROR_CHARS, secrets);
    const oauthErrorDescription = typeof json.error_description === 'string'
      ? clean(json.error_description, MAX_OAUTH_DESCRIPTION_CHARS, secrets)
      : undefined;
    const detail = oauthErrorDescription === undefined ? oauthError : `${oauthError}: ${oauthErrorDescription}`;
    throw new TokenResponseError(`token response carries an OAuth2 error (error=${detail})`, { oauthError, oauthErrorDescription });
  }

  const accessToken = json.access_token;
  if (typeof accessToken !== 'string' || accessToken === '') {
    throw new TokenResponseError('token response has no access_token');
  }
  if (!ACCESS_TOKEN.test(accessToken)) {
    throw new TokenResponseError('access_token contains characters that cannot go into a header (space, control or non-ASCII)');
  }

  let tokenType = 'Bearer';
  if (json.token_type !== undefined && json.token_type !== null) {
    if (typeof json.token_type !== 'string' || !HEADER_TOKEN.test(json.token_type)) {
      throw new TokenResponseError('token_type is not a valid HTTP token');
    }
    // RFC 6749 §5.1: token_type is case-insensitive; RFC 6750 spells the scheme "Bearer".
    tokenType = json.token_type.toLowerCase() === 'bearer' ? 'Bearer' : json.token_type;
  }

  let lifetimeSeconds: number;
  if (json.expires_in === undefined || json.expires_in === null) {
    // expires_in is only RECOMMENDED (RFC 6749 §5.1); a JWT's own exp is the next best thing.
    const exp = jwtExp(accessToken);
    if (exp === undefined) throw new TokenResponseError('token response has no expires_in and the access token is not a JWT with exp');
    lifetimeSeconds = exp - now / 1000;
    if (lifetimeSeconds <= 0) throw new TokenResponseError('token response has no expires_in and the JWT exp is already past');
  } else {
    const n = positiveSeconds(json.expires_in);
    if (n === undefined) throw new TokenResponseError('expires_in is not a positive number of seconds');
    lifetimeSeconds = n;
  }
  lifetimeSeconds = Math.min(lifetimeSeconds, MAX_LIFETIME_SECONDS);
  // Entra sends refresh_in; a bad one (or one past the token's own end) is ignored rather than
  // failing a usable token.
  const refreshInSeconds = positiveSeconds(json.refresh_in);

  return {
    accessToken,
    tokenType,
    obtainedAt: now,
    expiresAt: now + Math.round(lifetimeSeconds * 1000),
    refreshInSeconds: refreshInSeconds !== undefined && refreshInSeconds < lifetimeSeconds ? refreshInSeconds : undefined,
  };
}

/** A positive number, or a numeric string (Entra v1 sends "3599"). */
function positiveSeconds(value: unknown): number | undefined {
  const n = typeof value === 'number' ? value : typeof value === 'string' && NUMERIC.test(value) ? Number(value) : NaN;
  return Number.isFinite(n) && n > 0 ? n : undefined;
}

/** `exp` of a JWS compact token, read without verifying it (we only need a lifetime hint). */
function jwtExp(token: string): number | undefined {
  const exp = decodeJwtParts(token)?.claims.exp;
  return typeof exp === 'number' && Number.isFinite(exp) ? exp : undefined;
}

/** RFC 9110 §10.2.3: delay-seconds or an HTTP-date (resolved against the injected clock). */
function parseRetryAfter(value: string | undefined, now: number): number | undefined {
  if (value === undefined) return undefined;
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) return Number(trimmed);
  const date = Date.parse(trimmed);
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, Math.ceil((date - now) / 1000));
}

function header(headers: Headers, name: string): string | undefined {
  const v = headers[name];
  return Array.isArray(v) ? v[0] : v;
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** What answered with a body that is not an OAuth2 error: its type and size, never its text. */
function describeBody(headers: Headers, body: Body, secrets: readonly string[]): string {
  const type = clean(header(headers, 'content-type') ?? 'no content-type', 60, secrets);
  if (body.truncated) return `${type}, more than ${MAX_BODY_BYTES} bytes`;
  return body.bytes === 0 ? `${type}, empty body` : `${type}, ${body.bytes} bytes`;
}

/**
 * Text from the endpoint made fit for a message: every encoding of our secrets masked (an
 * endpoint may echo the request), control characters gone, whitespace folded, length capped.
 */
function clean(text: string, max: number, secrets: readonly string[]): string {
  let s = mask(text, secrets);
  s = s.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]+/g, ' ').replace(/\s+/g, ' ').trim();
  return s.length > max ? `${s.slice(0, max)}…` : s;
}

const REDACTED = '[redacted]';

/**
 * Replaces every occurrence of every encoding of the secrets with [redacted]. Matches are found
 * for each encoding on its own and merged, so that two overlapping encodings leave no tail of
 * either; case is ignored (an endpoint may re-encode `%2B` as `%2b`; masking a little more than
 * needed costs nothing).
 */
export function mask(text: string, secrets: readonly string[]): string {
  if (text === '' || secrets.length === 0) return text;
  const ranges: Array<[number, number]> = [];
  for (const needle of encodings(secrets)) {
    const re = new RegExp(needle.replace(/[\\^$.*+?()[\]{}|/]/g, '\\$&'), 'giu');
    for (const m of text.matchAll(re)) ranges.push([m.index, m.index + m[0].length]);
  }
  if (ranges.length === 0) return text;
  ranges.sort((a, b) => a[0] - b[0]);
  let out = '';
  let at = 0;
  let end = -1;
  for (const [from, to] of ranges) {
    if (from > end) {
      if (end >= 0) out += REDACTED;
      out += text.slice(at, from);
      end = to;
    } else {
      end = Math.max(end, to);
    }
    at = end;
  }
  return `${out}${REDACTED}${text.slice(at)}`;
}

/**
 * Every form in which a secret we sent can come back. The caller lists the raw values it put
 * into the request (see endpointError); the encodings are derived here, so that a new way to
 * send a credential needs no new masking code: the value as sent, form-encoded (space as `+` and
 * as `%20`), percent-encoded (encodeURIComponent and RFC 3986's stricter set, and once more on
 * top of the form encoding), base64 and base64url (padded or not), each also JSON-escaped (as
 * JSON.stringify writes it, and ASCII-only with `\/` as Python's json.dumps and PHP write it)
 * and HTML-escaped. An Authorization value (`Basic …`, `Bearer …`) also counts without its
 * scheme, and a Basic value's decoded `id:secret` pair and the secret inside it count too.
 */
function encodings(secrets: readonly string[]): string[] {
  const bases = new Set<string>();
  for (const secret of secrets) {
    if (secret === '') continue;
    bases.add(secret);
    const credentials = /^(?:basic|bearer) +([\x21-\x7e]+)$/i.exec(secret);
    if (credentials === null) continue;
    bases.add(credentials[1]!);
    if (!/^basic /i.test(secret)) continue;
    const pair = Buffer.from(credentials[1]!, 'base64').toString('utf8');
    const colon = pair.indexOf(':');
    if (colon < 0) continue;
    bases.add(pair);
    try {
      // RFC 6749 §2.3.1: the secret inside is form-encoded. The id before the colon is no secret.
      bases.add(decodeURIComponent(pair.slice(colon + 1).replace(/\+/g, ' ')));
    } catch {
      // Not form-encoded after all: the pair itself is masked.
    }
  }
  const out = new Set<string>();
  for (const base of bases) {
    const form = formEncode(base);
    const utf8 = Buffer.from(base, 'utf8');
    const plain = [
      base,
      form,
      form.replace(/\+/g, '%20'),
      encodeURIComponent(base),
      encodeURIComponent(base).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`),
      encodeURIComponent(form),
      utf8.toString('base64'),
      utf8.toString('base64').replace(/=+$/, ''),
      utf8.toString('base64url'),
    ];
    for (const p of plain) {
      out.add(p);
      const json = JSON.stringify(p).slice(1, -1);
      out.add(json);
      out.add(json.replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`).replace(/\//g, '\\/'));
      out.add(p.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`));
      out.add(p.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;'));
    }
  }
  out.delete('');
  // Longest first only for readability of a debugger's view; the merge above makes order moot.
  return [...out].sort((a, b) => b.length - a.length);
}
