// What every part of the bench gets: the tools found, the knobs, a scratch directory and a log.
import type { Tool } from './tools.ts';

export interface BenchContext {
  tools: Record<Tool['name'], Tool>;
  /** Measured seconds per turn (BENCH_SECONDS). */
  seconds: number;
  /** Turns per target (BENCH_ROUNDS). */
  rounds: number;
  /** The fixed moderate rate through Envoy, requests/s (BENCH_RATE). */
  rate: number;
  /** Length of the memory soak (BENCH_SOAK_SECONDS). */
  soakSeconds: number;
  /** `server.workers` of the sidecar under test (BENCH_WORKERS / --workers). */
  workers: number;
  /** Envoy worker threads (BENCH_ENVOY_CONCURRENCY). */
  envoyConcurrency: number;
  /** Seconds of h2load load while the CPU profile is taken (BENCH_PROFILE_SECONDS). */
  profileSeconds: number;
  dir: string;
  log(line: string): void;
}

/** One part of the report: markdown for docs/benchmarks.md and a few lines for the console. */
export interface Section {
  id: 'setup' | 'sidecar' | 'workers' | 'envoy' | 'modes' | 'tokens' | 'memory' | 'profile';
  markdown: string;
  /** Not measured: printed, but the table of an earlier run stays in docs/benchmarks.md. */
  skipped?: boolean;
}

export function skipped(id: Section['id'], title: string, why: string): Section {
  return { id, markdown: `### ${title}\n\nNot measured in this run: ${why}\n`, skipped: true };
}

/** Formatting for the tables. */
export const fmt = {
  int: (n: number): string => (Number.isFinite(n) ? Math.round(n).toLocaleString('en-US') : 'n/a'),
  ms: (us: number): string => (Number.isFinite(us) ? (us / 1000).toFixed(us < 10_000 ? 3 : 1) : 'n/a'),
  ratio: (r: number): string => (Number.isFinite(r) ? r.toFixed(2) : 'n/a'),
  signedMs: (us: number): string => (Number.isFinite(us) ? `${us >= 0 ? '+' : '−'}${(Math.abs(us) / 1000).toFixed(3)}` : 'n/a'),
  mb: (bytes: number): string => (Number.isFinite(bytes) ? (bytes / 1024 / 1024).toFixed(1) : 'n/a'),
};

export function table(header: readonly string[], rows: ReadonlyArray<readonly string[]>): string {
  const line = (cells: readonly string[]): string => `| ${cells.join(' | ')} |`;
  return [line(header), line(header.map((h, i) => (i === 0 ? '---' : '---:'))), ...rows.map(line)].join('\n');
}
