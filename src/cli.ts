// The command line: run the sidecar, check a config, or fetch one token for debugging.
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { loadConfig, type Config } from './config.ts';
import { describeConfig } from './config-summary.ts';
import { closest } from './config-validator.ts';
import { ConfigError, describeError, TokenEndpointError, TokenFetchError } from './errors.ts';
import { decodeJwtParts } from './jwt-parts.ts';
import { createLogger, type Logger } from './logger.ts';
import { Sidecar } from './server.ts';
import { TokenSource } from './token-source.ts';
import { isWorker, runWorker } from './workers.ts';

export interface Io {
  out(text: string): void;
  err(text: string): void;
}

const processIo: Io = {
  out: (text) => process.stdout.write(`${text}\n`),
  err: (text) => process.stderr.write(`${text}\n`),
};

const USAGE = `Usage:
  oauth2-extproc --config FILE                 run the ext_proc sidecar
  oauth2-extproc check-config --config FILE    validate FILE and print a summary (no secrets)
  oauth2-extproc token --config FILE [--profile NAME]
                                               fetch one token and describe it (never prints it)
  oauth2-extproc --help | --version

The config file is YAML; see the README for every key. \${VAR} reads the environment,
\${file:PATH} reads a file.`;

export function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}

const OPTIONS = {
  config: { type: 'string', short: 'c' },
  profile: { type: 'string', short: 'p' },
  help: { type: 'boolean', short: 'h' },
  version: { type: 'boolean', short: 'v' },
} as const;

/** node:util parseArgs' error in our words: an unknown flag with the one it is closest to. */
function usageProblem(err: unknown): string {
  const { code, message } = err as { code?: string; message: string };
  // Node's messages quote the option: "Unknown option '--confg'. To specify …".
  const option = /'(-[^' ]+)/.exec(message)?.[1];
  if (code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION' && option !== undefined) {
    const name = option.replace(/^-+/, '').split('=')[0]!;
    const hint = Object.entries(OPTIONS).find(([, o]) => o.short === name)?.[0] ?? closest(name, Object.keys(OPTIONS));
    return `unknown option ${option}${hint === undefined ? '' : ` (did you mean --${hint}?)`}`;
  }
  if (code === 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE') {
    const name = /--([\w-]+)/.exec(message)?.[1];
    if (name !== undefined && OPTIONS[name as keyof typeof OPTIONS]?.type === 'string') return `--${name} needs a value`;
    if (name !== undefined) return `--${name} takes no value`;
  }
  return message;
}

/** Returns the exit code for one-shot commands; for `run` it resolves once the server is up (undefined). */
export async function main(argv: readonly string[], io: Io = processIo): Promise<number | undefined> {
  let parsed;
  try {
    parsed = parseArgs({ args: [...argv], allowPositionals: true, options: OPTIONS });
  } catch (err) {
    io.err(`oauth2-extproc: ${usageProblem(err)}\n\n${USAGE}`);
    return 2;
  }
  const { values, positionals } = parsed;
  if (values.help) {
    io.out(USAGE);
    return 0;
  }
  if (values.version) {
    io.out(version());
    return 0;
  }
  const command = positionals[0] ?? 'run';
  if (positionals.length > 1 || !['run', 'check-config', 'token'].includes(command)) {
    io.err(`oauth2-extproc: unknown command "${positionals.join(' ')}"\n\n${USAGE}`);
    return 2;
  }
  if (values.config === undefined) {
    io.err(`oauth2-extproc: --config FILE is required\n\n${USAGE}`);
    return 2;
  }
  if (values.profile !== undefined && command !== 'token') {
    io.err('oauth2-extproc: --profile only applies to the token command');
    return 2;
  }

  let config: Config;
  try {
    config = loadConfig(values.config);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    io.err(`oauth2-extproc: ${values.config} is not valid (${err.problems.length} problem${err.problems.length === 1 ? '' : 's'}):`);
    for (const p of err.problems) io.err(`  ${p.path}: ${p.message}`);
    return 2;
  }

  if (command === 'check-config') {
    io.out(`${values.config}: valid`);
    io.out(describeConfig(config));
    return 0;
  }
  if (command === 'token') return fetchOneToken(config, values.profile ?? 'default', io);
  await run(config, io);
  return undefined;
}

async function run(config: Config, io: Io): Promise<void> {
  const logger = createLogger(config.logging.level);
  process.on('unhandledRejection', (reason) => {
    logger.error({ error: describeError(reason) }, 'unhandled promise rejection (kept serving)');
  });
  process.on('uncaughtException', (err) => {
    logger.fatal({ error: describeError(err) }, 'uncaught exception; exiting');
    exitAfterOutput(logger, 1);
  });

  if (isWorker()) {
    await runWorker(config, logger.child({ worker: process.pid }));
    return;
  }
  // Once, from the primary: workers parse the same file.
  for (const w of config.warnings) logger.warn({ path: w.path }, `config: ${w.message}`);
  const sidecar = new Sidecar({ config, logger });
  // The signal handlers go in before the listeners bind: a SIGTERM that arrives while the
  // sidecar starts (or right after its "listening" line) drains it instead of killing it.
  const starting = sidecar.start();
  let stoppingSince: number | undefined;
  const stop = (signal: NodeJS.Signals): void => {
    if (stoppingSince !== undefined) {
      // Ctrl-C under `npm start` reaches the sidecar twice at once: from the terminal (the
      // whole foreground process group) and from npm, which forwards it. One keypress.
      if (Date.now() - stoppingSince < 1000) return;
      logger.warn({ signal }, 'second signal: exiting now');
      exitAfterOutput(logger, 1);
      return;
    }
    stoppingSince = Date.now();
    logger.info({ signal }, 'shutting down');
    // A start that failed exits below, with its own message.
    starting.then(() => sidecar.shutdown(), () => new Promise<never>(() => {})).then(
      () => exitAfterOutput(logger, 0),
      (err: unknown) => {
        logger.error({ error: describeError(err) }, 'shutdown failed');
        exitAfterOutput(logger, 1);
      },
    );
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  try {
    await starting;
  } catch (err) {
    io.err(`oauth2-extproc: cannot listen (server.grpc ${config.server.grpc}, server.admin ${config.server.admin}): ${describeError(err).message}`);
    exitAfterOutput(logger, 1);
  }
}

/**
 * Exits once what was written has left: the log, and stdout and stderr, which are asynchronous
 * when they are pipes. Exiting at once lost the one-line "cannot listen" message under load.
 */
function exitAfterOutput(logger: Logger, code: number): void {
  logger.flush(() => process.stdout.write('', () => process.stderr.write('', () => process.exit(code))));
}

async function fetchOneToken(config: Config, profileName: string, io: Io): Promise<number> {
  const profile = config.profiles[profileName];
  if (profile === undefined) {
    io.err(`oauth2-extproc: no profile "${profileName}" (configured: ${Object.keys(config.profiles).join(', ')})`);
    return 2;
  }
  const started = Date.now();
  let sent: Record<string, unknown> | undefined;
  const source = new TokenSource(profile, { onCredentials: (details) => (sent = details) });
  // A managed identity's endpoint is among what the method describes.
  // Without its query: one may carry a key.
  const endpoint = profile.clientAuth === 'managed_identity' ? [] : [`token endpoint: ${withoutQuery(profile.tokenUrl)}`];
  try {
    const token = await source.fetch();
    const lines = [
      'status: ok',
      `profile: ${profile.name}`,
      ...endpoint,
      ...describeSent(profile.clientAuth, sent),
      `duration: ${Date.now() - started} ms`,
      `token type: ${token.tokenType}`,
      `token length: ${token.accessToken.length} characters (not shown)`,
      `expires in: ${Math.round((token.expiresAt - token.obtainedAt) / 1000)} s (at ${new Date(token.expiresAt).toISOString()})`,
    ];
    if (token.refreshInSeconds !== undefined) lines.push(`refresh in: ${token.refreshInSeconds} s (sent by the endpoint)`);
    const jwt = decodeJwtParts(token.accessToken);
    if (jwt === undefined) {
      lines.push('format: opaque (not a JWT)');
    } else {
      lines.push('format: JWT (signature not verified here)');
      lines.push(`header: ${JSON.stringify(jwt.header)}`);
      lines.push(`claims: ${JSON.stringify(jwt.claims, null, 2)}`);
    }
    io.out(lines.join('\n'));
    return 0;
  } catch (err) {
    const lines = ['status: failed', `profile: ${profile.name}`, ...endpoint, ...describeSent(profile.clientAuth, sent)];
    const { code, message } = describeError(err);
    lines.push(`error: ${code}`, `message: ${message}`);
    if (err instanceof TokenEndpointError) {
      lines.push(`http status: ${err.status}`);
      if (err.oauthError !== undefined) lines.push(`oauth error: ${err.oauthError}`);
      if (err.oauthErrorDescription !== undefined) lines.push(`oauth error_description: ${err.oauthErrorDescription}`);
    }
    if (err instanceof TokenFetchError && err.retryAfterSeconds !== undefined) lines.push(`retry after: ${err.retryAfterSeconds} s`);
    io.err(lines.join('\n'));
    return 1;
  } finally {
    await source.close();
  }
}

/** What the method sent, as its module described it: assertion header and claims, thumbprints; never a secret or a signature. */
function describeSent(method: string, details: Record<string, unknown> | undefined): string[] {
  const lines = [`client authentication: ${method}`];
  if (details === undefined) return lines;
  const { assertion, certificate, ...rest } = details;
  for (const [key, value] of Object.entries(rest)) lines.push(`${key}: ${typeof value === 'string' ? value : JSON.stringify(value)}`);
  if (typeof assertion === 'object' && assertion !== null) {
    const { header, claims } = assertion as { header?: unknown; claims?: unknown };
    lines.push(`assertion header: ${JSON.stringify(header)}`);
    lines.push(`assertion claims: ${JSON.stringify(claims, null, 2)}`);
    lines.push('assertion signature: (not shown)');
  } else if (assertion !== undefined) {
    lines.push(`assertion: ${String(assertion)} (not shown)`);
  }
  if (typeof certificate === 'object' && certificate !== null) {
    const c = certificate as Record<string, string>;
    lines.push(`certificate: ${c.subject} (issuer ${c.issuer}, valid until ${c.notAfter})`);
    lines.push(`certificate thumbprints: x5t#S256=${c.x5tS256} x5t=${c.x5t} (SHA-1 ${c.sha1Hex})`);
  }
  return lines;
}

/** A token URL (checked by the config) without its query. */
function withoutQuery(url: string): string {
  const u = new URL(url);
  return `${u.origin}${u.pathname}`;
}
