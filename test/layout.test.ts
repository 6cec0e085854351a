// The shape STYLE.md asks for, checked on the source itself: a helper two files need lives in a
// third (one definition, not two that drift apart).
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const SRC = fileURLToPath(new URL('../src/', import.meta.url));

function sources(dir = SRC): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? sources(join(dir, e.name)) : e.name.endsWith('.ts') ? [join(dir, e.name)] : []);
}

const files = new Map(sources().map((f) => [relative(SRC, f), readFileSync(f, 'utf8')]));

test('no top-level function is defined in two source files', () => {
  const where = new Map<string, string[]>();
  for (const [file, text] of files) {
    for (const m of text.matchAll(/^(?:export )?(?:async )?function ([A-Za-z0-9_]+)/gm)) where.set(m[1]!, [...(where.get(m[1]!) ?? []), file]);
  }
  assert.deepEqual([...where].filter(([, in_]) => in_.length > 1), []);
});

test('a JWT is decoded in one place, and a value form-encoded in one place', () => {
  const holding = (re: RegExp): string[] => [...files].filter(([, text]) => re.test(text)).map(([file]) => file);
  assert.deepEqual(holding(/Buffer\.from\(parts\[0\]!?, 'base64url'\)/), ['jwt-parts.ts']);
  assert.deepEqual(holding(/new URLSearchParams\(\[\[''/), ['form-encoding.ts']);
});

test('no import cycle in src/, type-only imports included', () => {
  const graph = new Map<string, string[]>();
  for (const [file, text] of files) {
    const deps = [...text.matchAll(/^(?:import|export)\b[^;]*?\bfrom '(\.{1,2}\/[^']+)'/gms)]
      .map((m) => relative(SRC, join(SRC, file, '..', m[1]!)));
    graph.set(file, deps);
  }
  const cycles: string[] = [];
  const state = new Map<string, 'open' | 'done'>();
  const visit = (file: string, path: string[]): void => {
    if (state.get(file) === 'done') return;
    if (state.get(file) === 'open') {
      cycles.push([...path.slice(path.indexOf(file)), file].join(' -> '));
      return;
    }
    state.set(file, 'open');
    for (const dep of graph.get(file) ?? []) visit(dep, [...path, file]);
    state.set(file, 'done');
  };
  for (const file of [...graph.keys()].sort()) visit(file, []);
  assert.deepEqual(cycles, []);
});
