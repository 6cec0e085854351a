// Runs the Dockerfile's build steps without Docker: each stage in a folder of its own (its `/`),
// COPY from the build context (filtered by .dockerignore) or from an earlier stage, RUN through
// `sh -c` in the stage's WORKDIR with the stage's ARG and ENV, and the Node that runs this
// script as the image's `node` (the same release: the `node` devDependency). npm installs from
// the local cache when it can (`prefer-offline`). A `FROM scratch` stage starts empty, so the
// final stage's folder holds the whole root filesystem of a distroless image, and the test can
// run it chrooted. It proves the steps produce a working node_modules and entry point; it cannot
// prove the base image exists or the image's size (test/containers/image.test.ts builds the
// real image). Used by test/deploy/dockerfile.test.ts, and by hand:
//
//   npx node scripts/docker-build-check.ts        # builds into a temp folder, runs --version, removes it
//   npx node scripts/docker-build-check.ts --keep # ... and keeps the folder (its path is printed)
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join, posix, relative } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

export const REPO = fileURLToPath(new URL('../', import.meta.url));

export interface Instruction {
  keyword: string;
  /** The rest of the line, continuations joined. */
  args: string;
  line: number;
}

export interface Stage {
  from: string;
  name: string | undefined;
  instructions: Instruction[];
}

/** Splits a Dockerfile into stages of instructions (comments dropped, `\` continuations joined). */
export function parseDockerfile(text: string): Stage[] {
  const stages: Stage[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    let line = lines[i]!.trim();
    const start = i + 1;
    if (line === '' || line.startsWith('#')) continue;
    while (line.endsWith('\\') && i + 1 < lines.length) {
      line = `${line.slice(0, -1).trimEnd()} ${lines[++i]!.trim()}`.trim();
    }
    const m = /^([A-Za-z]+)\s+(.*)$/.exec(line);
    if (!m) throw new Error(`Dockerfile line ${start}: cannot parse "${line}"`);
    const keyword = m[1]!.toUpperCase();
    const args = m[2]!.trim();
    if (keyword === 'FROM') {
      const from = /^(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$/i.exec(args);
      if (!from) throw new Error(`Dockerfile line ${start}: cannot parse FROM ${args}`);
      stages.push({ from: from[1]!, name: from[2], instructions: [] });
      continue;
    }
    const stage = stages.at(-1);
    if (stage === undefined) throw new Error(`Dockerfile line ${start}: ${keyword} before FROM`);
    stage.instructions.push({ keyword, args, line: start });
  }
  return stages;
}

/** The JSON (exec) form of ENTRYPOINT/CMD; the shell form is refused (it would swallow SIGTERM). */
export function execForm(args: string): string[] {
  const value: unknown = JSON.parse(args);
  if (!Array.isArray(value) || !value.every((v) => typeof v === 'string')) throw new Error(`not the exec form: ${args}`);
  return value;
}

/** Docker's .dockerignore: patterns in order, the last match wins, a parent's match counts. */
export function dockerignore(text: string): (path: string) => boolean {
  const rules = text.split('\n').map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#')).map((l) => {
    const negate = l.startsWith('!');
    const pattern = posix.normalize((negate ? l.slice(1) : l).replace(/^\/+/, '')).replace(/\/+$/, '');
    const source = pattern.split('**').map((part) => part.split('*').map((s) => s.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('[^/]*')).join('.*');
    return { negate, re: new RegExp(`^${source}$`) };
  });
  return (path: string): boolean => {
    const parts = path.split('/');
    const prefixes = parts.map((_, i) => parts.slice(0, i + 1).join('/'));
    let excluded = false;
    for (const rule of rules) {
      if (prefixes.some((p) => rule.re.test(p))) excluded = !rule.negate;
    }
    return excluded;
  };
}

export interface BuildResult {
  stages: Stage[];
  /** The folder holding every stage's folder: remove it when done. */
  outDir: string;
  /** The final stage's root folder (its `/`). */
  root: string;
  workdir: string;
  env: Record<string, string>;
  labels: Record<string, string>;
  user: string | undefined;
  entrypoint: string[];
  cmd: string[];
  /** HEALTHCHECK's command (exec form), without CMD. */
  healthcheck: string[] | undefined;
  log: string[];
}

/** `KEY=value` words, values optionally double-quoted (LABEL, ENV and ARG take this form). */
export function keyValues(args: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const m of args.matchAll(/([^\s=]+)=("(?:[^"\\]|\\.)*"|\S*)/g)) {
    out[m[1]!] = m[2]!.startsWith('"') ? (JSON.parse(m[2]!) as string) : m[2]!;
  }
  return out;
}

/** `${NAME}` and `$NAME` from `vars`, as Docker expands them in LABEL, ENV, WORKDIR and COPY. */
function expand(text: string, vars: Record<string, string>): string {
  return text.replace(/\$\{(\w+)\}|\$(\w+)/g, (_, a: string | undefined, b: string | undefined) => vars[(a ?? b)!] ?? '');
}

export function runDockerfileSteps(options: { context?: string; outDir?: string; quiet?: boolean } = {}): BuildResult {
  const context = options.context ?? REPO;
  const outDir = options.outDir ?? mkdtempSync(join(tmpdir(), 'oauth2-extproc-image-'));
  try {
    return buildStages(context, outDir, options.quiet ?? false);
  } catch (err) {
    // A failed build leaves nothing behind (each run holds a Node binary and node_modules).
    if (options.outDir === undefined) rmSync(outDir, { recursive: true, force: true });
    throw err;
  }
}

function buildStages(context: string, outDir: string, quiet: boolean): BuildResult {
  const stages = parseDockerfile(readFileSync(join(context, 'Dockerfile'), 'utf8'));
  const ignored = dockerignore(existsSync(join(context, '.dockerignore')) ? readFileSync(join(context, '.dockerignore'), 'utf8') : '');
  const roots = new Map<string, string>();
  const log: string[] = [];
  const say = (text: string): void => {
    log.push(text);
    if (!quiet) process.stdout.write(`${text}\n`);
  };
  let result: BuildResult | undefined;

  stages.forEach((stage, index) => {
    const root = join(outDir, stage.name ?? `stage-${index}`);
    mkdirSync(root, { recursive: true });
    if (stage.name !== undefined) roots.set(stage.name, root);
    let workdir = '/';
    const env: Record<string, string> = {};
    const args: Record<string, string> = {};
    const labels: Record<string, string> = {};
    let user: string | undefined;
    let entrypoint: string[] = [];
    let cmd: string[] = [];
    let healthcheck: string[] | undefined;
    const inRoot = (p: string): string => join(root, posix.resolve(workdir, p));
    say(`FROM ${stage.from}${stage.name ? ` AS ${stage.name}` : ''}  (emulated in ${root})`);

    for (const ins of stage.instructions) {
      say(`${ins.keyword} ${ins.args}`);
      switch (ins.keyword) {
        case 'WORKDIR':
          workdir = posix.resolve(workdir, ins.args);
          mkdirSync(inRoot('.'), { recursive: true });
          break;
        case 'ENV':
        case 'ARG':
        case 'LABEL': {
          const pairs = keyValues(ins.args);
          if (Object.keys(pairs).length === 0) throw new Error(`Dockerfile line ${ins.line}: ${ins.keyword} needs KEY=value`);
          const target = ins.keyword === 'ENV' ? env : ins.keyword === 'ARG' ? args : labels;
          for (const [key, value] of Object.entries(pairs)) target[key] = expand(value, { ...args, ...env });
          break;
        }
        case 'HEALTHCHECK': {
          const m = /^((?:--\S+\s+)*)CMD\s+(\[.*\])$/s.exec(ins.args);
          if (!m) throw new Error(`Dockerfile line ${ins.line}: HEALTHCHECK [--flags] CMD [exec form] expected`);
          healthcheck = execForm(m[2]!);
          break;
        }
        case 'COPY': {
          const words = ins.args.split(/\s+/);
          const flags = words.filter((w) => w.startsWith('--'));
          const paths = words.filter((w) => !w.startsWith('--'));
          const from = flags.find((f) => f.startsWith('--from='))?.slice('--from='.length);
          const unknown = flags.filter((f) => !f.startsWith('--from=') && !f.startsWith('--chown=') && !f.startsWith('--chmod='));
          if (unknown.length > 0 || paths.length < 2) throw new Error(`Dockerfile line ${ins.line}: COPY ${ins.args} is not emulated`);
          const dest = paths.pop()!;
          for (const src of paths) {
            let source: string;
            if (from !== undefined) {
              const fromRoot = roots.get(from);
              if (fromRoot === undefined) throw new Error(`Dockerfile line ${ins.line}: no earlier stage "${from}"`);
              source = join(fromRoot, src);
            } else {
              if (ignored(posix.normalize(src).replace(/\/$/, ''))) throw new Error(`Dockerfile line ${ins.line}: ${src} is excluded by .dockerignore`);
              source = join(context, src);
            }
            if (!existsSync(source)) throw new Error(`Dockerfile line ${ins.line}: ${src} does not exist`);
            const target = dest.endsWith('/') && !statSync(source).isDirectory() ? join(inRoot(dest), basename(src)) : inRoot(dest);
            cpSync(source, target, {
              recursive: true,
              filter: (p) => from !== undefined || !ignored(relative(context, p).split('\\').join('/')),
            });
          }
          break;
        }
        case 'RUN': {
          // Cache mounts only speed a build up: the command runs the same without them. Any
          // other flag (a secret or bind mount, a network mode) would change what runs.
          const flags = /^((?:--\S+\s+)*)(.*)$/s.exec(ins.args)!;
          const unknown = flags[1]!.split(/\s+/).filter((f) => f !== '' && !f.startsWith('--mount=type=cache,'));
          if (unknown.length > 0) throw new Error(`Dockerfile line ${ins.line}: RUN ${unknown.join(' ')} is not emulated`);
          if (/\bnpm cache clean\b/.test(flags[2]!)) throw new Error(`Dockerfile line ${ins.line}: npm cache clean would empty this machine's cache; use a cache mount`);
          // The image's `node` is the Node running this script; npm takes packages from the
          // local cache when it has them.
          const run = spawnSync('sh', ['-c', flags[2]!], {
            cwd: inRoot('.'),
            env: { ...process.env, ...args, ...env, PATH: `${dirname(process.execPath)}:${process.env.PATH ?? ''}`, npm_config_prefer_offline: 'true', npm_config_update_notifier: 'false' },
            encoding: 'utf8',
            stdio: ['ignore', 'pipe', 'pipe'],
          });
          if (run.stdout.trim()) say(run.stdout.trim());
          if (run.status !== 0) throw new Error(`Dockerfile line ${ins.line}: RUN ${ins.args} failed (${run.status}):\n${run.stdout}${run.stderr}`);
          break;
        }
        case 'USER':
          user = ins.args;
          break;
        case 'ENTRYPOINT':
          entrypoint = execForm(ins.args);
          break;
        case 'CMD':
          cmd = execForm(ins.args);
          break;
        case 'EXPOSE':
          break;
        default:
          throw new Error(`Dockerfile line ${ins.line}: ${ins.keyword} is not emulated by this check`);
      }
    }
    result = { stages, outDir, root, workdir, env, labels, user, entrypoint, cmd, healthcheck, log };
  });
  if (result === undefined) throw new Error('the Dockerfile has no stage');
  return result;
}

/** Runs the final stage's ENTRYPOINT with `args` (instead of CMD) in its WORKDIR and ENV. */
export function runEntrypoint(build: BuildResult, args: string[]): { status: number | null; stdout: string; stderr: string } {
  const [program, ...rest] = build.entrypoint;
  if (program === undefined) throw new Error('no ENTRYPOINT');
  const bin = program === 'node' ? process.execPath : program;
  const out = spawnSync(bin, [...rest, ...args], {
    cwd: join(build.root, build.workdir),
    env: { PATH: process.env.PATH ?? '', ...build.env },
    encoding: 'utf8',
  });
  return { status: out.status, stdout: out.stdout, stderr: out.stderr };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const started = Date.now();
  const keep = process.argv.includes('--keep');
  const build = runDockerfileSteps();
  try {
    const version = runEntrypoint(build, ['--version']);
    process.stdout.write(`\n${build.entrypoint.join(' ')} --version → ${version.stdout.trim() || version.stderr.trim()} (exit ${version.status}); built in ${((Date.now() - started) / 1000).toFixed(1)} s${keep ? ` at ${build.root}` : ''}\n`);
    process.exitCode = version.status === 0 ? 0 : 1;
  } finally {
    if (!keep) rmSync(build.outDir, { recursive: true, force: true });
  }
}
