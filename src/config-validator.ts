// The validating reader behind config.ts: typed accessors that record every problem by its
// path instead of throwing, and the ${VAR} / ${file:PATH} templates.
import { readFileSync } from 'node:fs';
import { isAbsolute, resolve } from 'node:path';
import type { ConfigProblem } from './errors.ts';
import type { SecretValue } from './config-types.ts';

// RFC 7230 token characters: what Envoy accepts as a header name.
const HEADER_NAME = /^[!#$%&'*+\-.^_`|~0-9a-z]+$/;

type Template = Array<{ literal: string } | { env: string } | { file: string }>;

export class Validator {
  private readonly problems: ConfigProblem[];
  private readonly env: NodeJS.ProcessEnv;
  private readonly baseDir: string;
  /** Valid but risky settings (plain http to a remote host, a secret written into the file). */
  readonly warnings: ConfigProblem[] = [];

  constructor(problems: ConfigProblem[], env: NodeJS.ProcessEnv, baseDir: string) {
    this.problems = problems;
    this.env = env;
    this.baseDir = baseDir;
  }

  problem(path: string, message: string): void {
    this.problems.push({ path, message });
  }

  warning(path: string, message: string): void {
    this.warnings.push({ path, message });
  }

  /** A mapping; keys outside `allowed` are errors (null allows any key). */
  object(value: unknown, path: string, allowed: readonly string[] | null, required = false): Record<string, any> | undefined {
    if (value === undefined || value === null) {
      if (required) this.problem(path || '(root)', 'required');
      return undefined;
    }
    if (!isPlainObject(value)) {
      this.problem(path || '(root)', 'must be a mapping');
      return undefined;
    }
    if (allowed !== null) {
      for (const key of Object.keys(value)) {
        if (!allowed.includes(key)) {
          const hint = closest(key, allowed);
          this.problem(path ? `${path}.${key}` : key, `unknown key${hint ? ` (did you mean "${hint}"?)` : ''}`);
        }
      }
    }
    return value;
  }

  /** A string with `${VAR}` and `${file:PATH}` expanded once, now. */
  string(value: unknown, path: string, opts: { required?: boolean; default?: string } = {}): string | undefined {
    const template = this.template(value, path, opts.required === true);
    if (template === undefined) return opts.default;
    const out = this.expand(template, path);
    if (out === undefined) return undefined;
    if (out === '' && opts.required) {
      this.problem(path, 'required (it is empty)');
      return undefined;
    }
    return out;
  }

  /** Like string(), but `${file:…}` parts are read again at each use. Checked readable now. */
  secret(value: unknown, path: string): SecretValue | undefined {
    const template = this.template(value, path, true);
    if (template === undefined) return undefined;
    const now = this.expand(template, path);
    if (now === undefined) return undefined;
    if (now === '') {
      this.problem(path, 'required (it is empty)');
      return undefined;
    }
    const baseDir = this.baseDir;
    const files = template.flatMap((part) => ('file' in part ? [isAbsolute(part.file) ? part.file : resolve(baseDir, part.file)] : []));
    const vars = template.flatMap((part) => ('env' in part ? [`\${${part.env}}`] : []));
    const source = files.length > 0 ? `file ${files.join(', ')}` : vars.length > 0 ? vars.join(', ') : 'the config file';
    if (files.length === 0) return { read: () => now, source };
    const env = this.env;
    return {
      source,
      // Re-read so a rotated Kubernetes Secret is picked up by the next token fetch.
      read: () => template.map((part) => ('literal' in part ? part.literal : 'env' in part ? env[part.env] ?? '' : readSecretFile(part.file, baseDir))).join(''),
    };
  }

  number(value: unknown, path: string, opts: { default: number; min?: number; max?: number; integer?: boolean }): number {
    if (value === undefined || value === null) return opts.default;
    const n = typeof value === 'string' && value.trim() !== '' ? Number(this.expand(this.template(value, path, false) ?? [], path)) : value;
    if (typeof n !== 'number' || !Number.isFinite(n)) {
      this.problem(path, 'must be a number');
      return opts.default;
    }
    if (opts.integer && !Number.isInteger(n)) this.problem(path, 'must be a whole number');
    else if (opts.min !== undefined && n < opts.min) this.problem(path, `must be at least ${opts.min}`);
    else if (opts.max !== undefined && n > opts.max) this.problem(path, `must be at most ${opts.max}`);
    return n;
  }

  oneOf<T extends string>(value: unknown, path: string, allowed: readonly T[], fallback: T): T {
    const s = this.string(value, path);
    if (s === undefined) return fallback;
    if (!allowed.includes(s as T)) {
      this.problem(path, `must be one of ${allowed.join(', ')}`);
      return fallback;
    }
    return s as T;
  }

  headerName(value: unknown, path: string, fallback: string | undefined): string | undefined {
    const s = this.string(value, path);
    if (s === undefined) return fallback;
    const lower = s.toLowerCase();
    if (!HEADER_NAME.test(lower.replace(/^:/, ''))) {
      this.problem(path, 'is not a valid HTTP header name');
      return fallback;
    }
    return lower;
  }

  url(value: string, path: string): void {
    let u: URL;
    try {
      u = new URL(value);
    } catch {
      this.problem(path, 'must be an absolute http(s) URL');
      return;
    }
    if (u.protocol !== 'https:' && u.protocol !== 'http:') this.problem(path, 'must be an absolute http(s) URL');
    else if (u.username || u.password) this.problem(path, 'must not carry credentials; use clientId and clientSecret');
  }

  address(value: string, path: string, unixAllowed: boolean): void {
    if (value.startsWith('unix:')) {
      if (!unixAllowed) this.problem(path, 'must be host:port');
      else if (value.length <= 'unix:'.length) this.problem(path, 'unix: needs a socket path');
      return;
    }
    const m = /^(\[[0-9a-fA-F:]+\]|[^:\s]+):(\d{1,5})$/.exec(value);
    if (!m || Number(m[2]) > 65535) this.problem(path, `must be host:port${unixAllowed ? ' or unix:/path/to.sock' : ''}`);
  }

  private template(value: unknown, path: string, required: boolean): Template | undefined {
    if (value === undefined || value === null) {
      if (required) this.problem(path, 'required');
      return undefined;
    }
    if (typeof value === 'number' || typeof value === 'boolean') value = String(value);
    if (typeof value !== 'string') {
      this.problem(path, 'must be a string');
      return undefined;
    }
    const parts: Template = [];
    let valid = true;
    const re = /\$\{([^}]*)\}/g;
    let last = 0;
    for (let m = re.exec(value); m !== null; m = re.exec(value)) {
      if (m.index > last) parts.push({ literal: value.slice(last, m.index) });
      const ref = m[1] ?? '';
      if (ref.startsWith('file:')) {
        const file = ref.slice('file:'.length);
        if (file === '') {
          this.problem(path, '${file:} needs a path');
          valid = false;
        } else {
          parts.push({ file });
        }
      } else if (/^[A-Za-z_][A-Za-z0-9_]*$/.test(ref)) {
        parts.push({ env: ref });
      } else {
        this.problem(path, `\${${ref}} is neither \${NAME} (environment) nor \${file:PATH}`);
        valid = false;
      }
      last = m.index + m[0].length;
    }
    if (last < value.length) parts.push({ literal: value.slice(last) });
    return valid ? parts : undefined;
  }

  private expand(template: Template, path: string): string | undefined {
    let ok = true;
    const out = template.map((part) => {
      if ('literal' in part) return part.literal;
      if ('env' in part) {
        const val = this.env[part.env];
        if (val === undefined) {
          this.problem(path, `environment variable ${part.env} is not set`);
          ok = false;
          return '';
        }
        return val;
      }
      try {
        return readSecretFile(part.file, this.baseDir);
      } catch (err) {
        this.problem(path, `cannot read file ${part.file} (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
        ok = false;
        return '';
      }
    }).join('');
    return ok ? out : undefined;
  }
}

/** Secret files (Kubernetes, docker) usually end with a newline that is not part of the secret. */
function readSecretFile(file: string, baseDir: string): string {
  return readFileSync(isAbsolute(file) ? file : resolve(baseDir, file), 'utf8').replace(/\r?\n$/, '');
}

export function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** The allowed key nearest to a typo, if it is near enough to be a likely meaning. */
export function closest(key: string, allowed: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = Math.max(2, Math.floor(key.length / 3)) + 1;
  for (const candidate of allowed) {
    const d = editDistance(key.toLowerCase(), candidate.toLowerCase());
    if (d < bestDistance) {
      best = candidate;
      bestDistance = d;
    }
  }
  return best;
}

function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) {
      cur[j] = Math.min((prev[j] ?? 0) + 1, (cur[j - 1] ?? 0) + 1, (prev[j - 1] ?? 0) + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = cur;
  }
  return prev[b.length] ?? 0;
}
