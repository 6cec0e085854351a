// The only reader of the config file and of process.env. Everything is parsed and validated
// here, at start, every problem reported at once by its path in the file; the result is frozen.
import { readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { resolve } from 'node:path';
import { LineCounter, parseDocument } from 'yaml';
import { CLIENT_AUTH_KEYS, isLoopback, parseClientAuth } from './config-client-auth.ts';
import type { Config, LogLevel, ProfileConfig, ProxyConfig, RefreshConfig, ServerConfig } from './config-types.ts';
import { isPlainObject, Validator } from './config-validator.ts';
import { ConfigError, type ConfigProblem } from './errors.ts';

export * from './config-types.ts';

export const DEFAULT_PROFILE = 'default';
export const SUBSCRIPTION_KEY_HEADER = 'ocp-apim-subscription-key';
export const SUBSCRIPTION_KEY_QUERY = 'subscription-key';
/** The statuses the deny answer may carry (proto/envoy/type/v3/http_status.proto lists the same). */
export const FAILURE_STATUSES = [401, 403, 429, 500, 502, 503, 504] as const;

const MAX_WORKERS = 64;
const LOG_LEVELS: readonly LogLevel[] = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'];
const RESERVED_FORM_PARAMS = new Set(['grant_type', 'client_id', 'client_secret', 'client_assertion', 'client_assertion_type', 'scope', 'resource', 'audience']);

export interface LoadOptions {
  env?: NodeJS.ProcessEnv;
  /** Relative `${file:…}` paths resolve against this folder (the config file's by default). */
  baseDir?: string;
  /** Azure Arc's tokens folder, for tests (default: the agent's, /var/opt/azcmagent/tokens on Linux). */
  arcKeyDir?: string;
}

/** Reads and validates a config file. Throws ConfigError listing every problem. */
export function loadConfig(file: string, options: LoadOptions = {}): Config {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError([{ path: file, message: `cannot read the config file (${(err as NodeJS.ErrnoException).code ?? 'error'})` }]);
  }
  return parseConfig(text, { ...options, env: options.env ?? process.env, baseDir: options.baseDir ?? resolve(file, '..') });
}

export function parseConfig(text: string, options: LoadOptions = {}): Config {
  const problems: ConfigProblem[] = [];
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { uniqueKeys: true, prettyErrors: false, lineCounter });
  for (const e of doc.errors) {
    const { line, col } = lineCounter.linePos(e.pos[0]);
    problems.push({ path: `line ${line}, column ${col}`, message: `YAML: ${e.message.split('\n')[0]}` });
  }
  if (problems.length > 0) throw new ConfigError(problems);

  const env = options.env ?? process.env;
  const baseDir = options.baseDir ?? process.cwd();
  const v = new Validator(problems, env, baseDir);
  const root = v.object(doc.toJS(), '', ['server', 'logging', 'profiles']);

  const server = v.object(root?.server, 'server', ['grpc', 'admin', 'shutdownGraceSeconds', 'workers', 'streamIdleSeconds']);
  const grpc = v.string(server?.grpc, 'server.grpc', { default: '127.0.0.1:9001' });
  const admin = v.string(server?.admin, 'server.admin', { default: '127.0.0.1:9002' });
  if (grpc !== undefined) v.address(grpc, 'server.grpc', true);
  if (admin !== undefined) v.address(admin, 'server.admin', false);
  const serverConfig: ServerConfig = {
    grpc: grpc ?? '',
    admin: admin ?? '',
    shutdownGraceSeconds: v.number(server?.shutdownGraceSeconds, 'server.shutdownGraceSeconds', { default: 10, min: 0, max: 3600 }),
    workers: parseWorkers(v, server?.workers),
    streamIdleSeconds: v.number(server?.streamIdleSeconds, 'server.streamIdleSeconds', { default: 60, min: 1, max: 86_400 }),
  };

  const logging = v.object(root?.logging, 'logging', ['level']);
  const level = v.string(logging?.level, 'logging.level', { default: 'info' });
  if (level !== undefined && !LOG_LEVELS.includes(level as LogLevel)) {
    problems.push({ path: 'logging.level', message: `must be one of ${LOG_LEVELS.join(', ')}` });
  }

  const profiles: Record<string, ProfileConfig> = {};
  const rawProfiles = root?.profiles;
  if (rawProfiles === undefined || rawProfiles === null) {
    problems.push({ path: 'profiles', message: 'required: at least one profile' });
  } else if (!isPlainObject(rawProfiles)) {
    problems.push({ path: 'profiles', message: 'must be a mapping of profile names to profiles' });
  } else if (Object.keys(rawProfiles).length === 0) {
    problems.push({ path: 'profiles', message: 'required: at least one profile' });
  } else {
    for (const [name, raw] of Object.entries(rawProfiles)) {
      if (!/^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(name)) {
        problems.push({ path: `profiles.${name}`, message: 'a profile name uses letters, digits, ".", "_" and "-"' });
      }
      const profile = parseProfile(v, name, raw, env, baseDir, options.arcKeyDir);
      if (profile !== undefined) profiles[name] = profile;
    }
  }

  if (problems.length > 0) throw new ConfigError(problems);
  if (serverConfig.grpc !== '' && !serverConfig.grpc.startsWith('unix:') && !isLoopback(serverConfig.grpc.replace(/:\d+$/, ''))) {
    // Whoever reaches the port can have Envoy's requests answered with our tokens.
    v.warning('server.grpc', `listens on ${serverConfig.grpc} without TLS: anyone who reaches it gets the tokens injected; bind 127.0.0.1 or a unix socket next to Envoy, or restrict who can reach it (a NetworkPolicy, a compose network)`);
  }
  return deepFreeze({ server: serverConfig, logging: { level: level as LogLevel }, profiles, warnings: v.warnings });
}

/** `server.workers`: a whole number from 1 to 64, or `auto` (one per core, at most 64), `${VAR}` allowed. */
function parseWorkers(v: Validator, raw: unknown): number {
  const expanded = typeof raw === 'string' ? v.string(raw, 'server.workers') : raw;
  if (typeof expanded === 'string' && expanded.trim().toLowerCase() === 'auto') return Math.min(availableParallelism(), MAX_WORKERS);
  if (typeof expanded === 'string' && expanded.trim() !== '' && !Number.isFinite(Number(expanded))) {
    v.problem('server.workers', `must be a whole number from 1 to ${MAX_WORKERS}, or auto`);
    return 1;
  }
  return v.number(expanded, 'server.workers', { default: 1, min: 1, max: MAX_WORKERS, integer: true });
}

function parseProfile(
  v: Validator, name: string, raw: unknown, env: NodeJS.ProcessEnv, baseDir: string, arcKeyDir: string | undefined,
): ProfileConfig | undefined {
  const at = `profiles.${name}`;
  const p = v.object(raw, at, [
    'clientAuth', 'scope', 'resource', ...CLIENT_AUTH_KEYS,
    'timeoutSeconds', 'maxTokenBytes', 'header', 'subscriptionKeyHeader', 'removeHeaders', 'removeQueryParameters', 'onFailure', 'failureStatus', 'refresh',
  ], true);
  if (p === undefined) return undefined;

  const scope = v.string(p.scope, `${at}.scope`);
  // Which keys each clientAuth needs, allows or ignores: config-client-auth.ts.
  const auth = parseClientAuth(v, at, p, env, baseDir, scope, v.string(p.resource, `${at}.resource`), arcKeyDir);
  const resource = auth.resource;
  const audience = v.string(p.audience, `${at}.audience`);

  const extraParams: Record<string, string> = {};
  const rawExtra = v.object(p.extraParams, `${at}.extraParams`, null);
  for (const [key, value] of Object.entries(rawExtra ?? {})) {
    const path = `${at}.extraParams.${key}`;
    if (RESERVED_FORM_PARAMS.has(key)) {
      v.problem(path, `"${key}" is set by the sidecar; use the profile's own key for it`);
      continue;
    }
    const s = v.string(typeof value === 'number' || typeof value === 'boolean' ? String(value) : value, path, { required: true });
    if (s !== undefined) extraParams[key] = s;
  }

  const header = v.headerName(p.header, `${at}.header`, 'authorization');
  const subscriptionKey = v.headerName(p.subscriptionKeyHeader, `${at}.subscriptionKeyHeader`, SUBSCRIPTION_KEY_HEADER);
  const removeHeaders = new Set<string>([subscriptionKey ?? SUBSCRIPTION_KEY_HEADER]);
  // A caller's Authorization must never reach the backend, even when the token goes elsewhere.
  if (header !== undefined && header !== 'authorization') removeHeaders.add('authorization');
  if (p.removeHeaders !== undefined && p.removeHeaders !== null) {
    if (!Array.isArray(p.removeHeaders)) {
      v.problem(`${at}.removeHeaders`, 'must be a list of header names');
    } else {
      p.removeHeaders.forEach((h: unknown, i: number) => {
        const name = v.headerName(h, `${at}.removeHeaders[${i}]`, undefined);
        if (name === undefined) return;
        if (name.startsWith(':') || name === 'host') v.problem(`${at}.removeHeaders[${i}]`, 'Envoy never lets a processor remove pseudo-headers or host');
        else if (name === header) v.problem(`${at}.removeHeaders[${i}]`, `"${name}" is the header the token is injected into`);
        else removeHeaders.add(name);
      });
    }
  }

  const removeQueryParameters: string[] = [];
  if (p.removeQueryParameters === undefined || p.removeQueryParameters === null) {
    removeQueryParameters.push(SUBSCRIPTION_KEY_QUERY);
  } else if (!Array.isArray(p.removeQueryParameters)) {
    v.problem(`${at}.removeQueryParameters`, 'must be a list of query parameter names ([] to keep the query as it is)');
  } else {
    p.removeQueryParameters.forEach((q: unknown, i: number) => {
      const name = v.string(q, `${at}.removeQueryParameters[${i}]`, { required: true });
      if (name === undefined) return;
      if (/[&=#?\s]/.test(name)) v.problem(`${at}.removeQueryParameters[${i}]`, 'a query parameter name has no "&", "=", "#", "?" or spaces');
      else removeQueryParameters.push(name);
    });
  }

  const onFailure = v.oneOf(p.onFailure, `${at}.onFailure`, ['deny', 'allow'], 'deny');
  const failureStatus = v.number(p.failureStatus, `${at}.failureStatus`, { default: 503, integer: true });
  if (!(FAILURE_STATUSES as readonly number[]).includes(failureStatus)) {
    v.problem(`${at}.failureStatus`, `must be one of ${FAILURE_STATUSES.join(', ')}`);
  }

  const r = v.object(p.refresh, `${at}.refresh`, ['share', 'jitter', 'marginSeconds', 'minBackoffSeconds', 'maxBackoffSeconds', 'onBackendStatus']);
  const refresh: RefreshConfig = {
    share: v.number(r?.share, `${at}.refresh.share`, { default: 0.5, min: 0.05, max: 0.95 }),
    jitter: v.number(r?.jitter, `${at}.refresh.jitter`, { default: 0.05, min: 0, max: 0.25 }),
    marginSeconds: v.number(r?.marginSeconds, `${at}.refresh.marginSeconds`, { default: 30, min: 0, max: 3600 }),
    minBackoffSeconds: v.number(r?.minBackoffSeconds, `${at}.refresh.minBackoffSeconds`, { default: 1, min: 0.05, max: 3600 }),
    maxBackoffSeconds: v.number(r?.maxBackoffSeconds, `${at}.refresh.maxBackoffSeconds`, { default: 60, min: 0.05, max: 3600 }),
    onBackendStatus: backendStatuses(v, r?.onBackendStatus, `${at}.refresh.onBackendStatus`),
  };
  if (refresh.maxBackoffSeconds < refresh.minBackoffSeconds) {
    v.problem(`${at}.refresh.maxBackoffSeconds`, 'must not be smaller than minBackoffSeconds');
  }

  return {
    name,
    tokenUrl: auth.tokenUrl,
    clientId: auth.clientId,
    clientSecret: auth.clientSecret,
    clientAuth: auth.clientAuth,
    // Only what the method uses, so a secret-based profile reads as it always did.
    ...definedOnly({
      privateKey: auth.privateKey, certificate: auth.certificate, keyId: auth.keyId, assertion: auth.assertion,
      tokenFile: auth.tokenFile, managedIdentity: auth.managedIdentity, tls: auth.tls,
      proxy: auth.clientAuth === 'managed_identity' ? undefined : proxyFrom(env),
    }),
    scope,
    resource,
    audience,
    extraParams,
    timeoutMs: Math.round(v.number(p.timeoutSeconds, `${at}.timeoutSeconds`, { default: 20, min: 0.1, max: 300 }) * 1000),
    // Envoy 1.40 with the shipped config passed a 61,227-byte value and refused 61,247 bytes
    // (max_request_headers_kb 60, for all headers): 16 KiB leaves the caller's own headers 44 KiB.
    maxTokenBytes: v.number(p.maxTokenBytes, `${at}.maxTokenBytes`, { default: 16_384, min: 256, max: 1_048_576, integer: true }),
    header: header ?? 'authorization',
    removeHeaders: [...removeHeaders],
    removeQueryParameters,
    onFailure,
    failureStatus,
    refresh,
  };
}

/** `refresh.onBackendStatus`: a list of HTTP statuses a backend answers with (400–599). */
function backendStatuses(v: Validator, value: unknown, path: string): number[] {
  if (value === undefined || value === null) return [];
  if (!Array.isArray(value)) {
    v.problem(path, 'must be a list of HTTP statuses, e.g. [401]');
    return [];
  }
  const statuses = new Set<number>();
  value.forEach((item: unknown, i: number) => {
    const status = v.number(item, `${path}[${i}]`, { default: 0, min: 400, max: 599, integer: true });
    if (status >= 400 && status <= 599 && Number.isInteger(status)) statuses.add(status);
  });
  return [...statuses];
}

function definedOnly<T extends Record<string, unknown>>(fields: T): Partial<T> {
  return Object.fromEntries(Object.entries(fields).filter(([, value]) => value !== undefined)) as Partial<T>;
}

/** The proxy variables as curl and undici read them (lower case first), or undefined when none is set. */
function proxyFrom(env: NodeJS.ProcessEnv): ProxyConfig | undefined {
  const get = (name: string): string | undefined => env[name.toLowerCase()] || env[name] || undefined;
  const proxy = { httpsProxy: get('HTTPS_PROXY'), httpProxy: get('HTTP_PROXY'), noProxy: get('NO_PROXY') };
  return proxy.httpsProxy === undefined && proxy.httpProxy === undefined ? undefined : proxy;
}

function deepFreeze<T>(value: T): T {
  if (typeof value === 'object' && value !== null && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const v of Object.values(value)) deepFreeze(v);
  }
  return value;
}
