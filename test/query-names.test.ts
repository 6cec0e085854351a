// The query-name rule of docs/query-names.md, one case per rule, then checked against the real
// parsers this machine has (PHP, Python, Go, Node, Ruby Rack): whatever one of them reads as a
// removed name must be removed.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import querystring from 'node:querystring';
import { test } from 'node:test';
import { HeaderNamePolicy, headerNameKey } from '../src/policy/header-names.ts';
import { foldName, normalizedQueryNames, phpName, QueryNamePolicy } from '../src/policy/query-names.ts';

const policy = new QueryNamePolicy(['subscription-key']);

/** [rule (as in docs/query-names.md), who reads it so, raw parameter name, removed?] */
const RULES: Array<[string, string, string, boolean]> = [
  ['as sent', 'all', 'subscription-key', true],
  ['percent-decoding', 'all', 'subscription%2Dkey', true],
  ['percent-decoding, lower-case hex', 'all', 'subscription%2dkey', true],
  ['%uXXXX', 'ASP.NET HttpUtility.UrlDecode', '%u0073ubscription-key', true],
  ['two levels of encoding', 'an app or proxy that decodes again', 'subscription%252Dkey', true],
  ['three levels of encoding', 'idem', 'subscription%25252Dkey', true],
  ['still encoded after 8 levels', '(fail closed)', `subscription%${'25'.repeat(9)}2Dkey`, true],
  ['+ is a space, leading spaces dropped', 'PHP', '+subscription-key', true],
  ['%20 leading', 'PHP', '%20subscription-key', true],
  ['several leading spaces', 'PHP', '++%20subscription-key', true],
  ['raw leading space', 'ASP.NET Core, Rack (after a separator)', ' subscription-key', true],
  ['leading tab or newline', '(trimmed: no client sends it)', '%09subscription-key', true],
  ['trailing space', '(trimmed)', 'subscription-key%20', true],
  ['trailing control byte', '(trimmed)', 'subscription-key%7F', true],
  ['NUL ends the name', 'PHP', 'subscription-key%00', true],
  ['NUL, then anything', 'PHP', 'subscription-key%00x', true],
  ['array suffix []', 'PHP, qs, Rack', 'subscription-key[]', true],
  ['array suffix [0]', 'PHP, qs, Rack, ASP.NET Core, Spring', 'subscription-key[0]', true],
  ['encoded array suffix', 'PHP, qs, Rack', 'subscription-key%5B%5D', true],
  ['hash suffix [a][b]', 'PHP, qs, Rack', 'subscription-key[a][b]', true],
  ['unmatched [ suffix', 'qs', 'subscription-key[', true],
  ['] suffix', 'Rack 2', 'subscription-key]', true],
  ['leading brackets', 'Rack 2, qs', '[subscription-key]', true],
  ['leading ] brackets', 'Rack 2', ']]subscription-key', true],
  ['dot suffix', 'qs allowDots, Spring and ASP.NET property paths', 'subscription-key.x', true],
  ['leading dot', 'qs allowDots', '.subscription-key', true],
  ['! prefix (default value)', 'Spring WebDataBinder', '!subscription-key', true],
  ['ASCII case', 'ASP.NET (OrdinalIgnoreCase)', 'Subscription-KEY', true],
  ['encoded ASCII case', 'ASP.NET', '%53UBSCRIPTION-KEY', true],
  ['U+017F long s', 'Java equalsIgnoreCase', '%C5%BFubscription-key', true],
  ['U+0131 dotless i', 'Java equalsIgnoreCase, .NET', 'subscr%C4%B1ption-key', true],
  ['U+0130 capital I with dot', 'Java equalsIgnoreCase', 'subscr%C4%B0ption-key', true],
  ['U+212A Kelvin sign', 'Java equalsIgnoreCase', 'subscription-%E2%84%AAey', true],
  ['raw UTF-8 bytes of U+017F', 'idem', Buffer.from('ſubscription-key', 'utf8').toString('latin1'), true],
  ['rules combined', 'qs + ASP.NET', '+Subscription%2DKey%5B0%5D', true],
  ['a name past 1,024 chars that holds the name', '(not read further: bounded work)', `subscription-key${'x'.repeat(2000)}`, true],
  // Kept: names no framework reads as subscription-key.
  ['another name', '-', 'subscription-keys', false],
  ['prefix is part of the name', '-', 'xsubscription-key', false],
  ['PHP reads _ for space, but not as -', '-', 'subscription+key', false],
  ['underscore is another name', '-', 'subscription_key', false],
  ['nested under another name', 'qs, Rack, PHP: a[subscription-key]', 'a[subscription-key]', false],
  ['invalid UTF-8 in the name', '-', 'subscription-key%FF', false],
  ['fullwidth letters (no framework folds them)', '-', '%EF%BD%93ubscription-key', false],
  ['malformed escape kept as is', '-', 'subscription-key%zz', false],
  ['a long name without it', '-', `${'%41'.repeat(3000)}subscription`, false],
  ['shorter than the name', '-', '%73%75%62', false],
];

test('one case per rule: isRemoved, and strip() keeps every other parameter as it was', () => {
  for (const [rule, who, raw, removed] of RULES) {
    assert.equal(policy.isRemoved(raw), removed, `${rule} (${who}): ${JSON.stringify(raw)}`);
    const path = `/p?a=1&${raw}=k&b=%2F`;
    assert.equal(policy.strip(path), removed ? '/p?a=1&b=%2F' : undefined, `${rule}: ${JSON.stringify(path)}`);
  }
});

test('strip: separators, empty parameters and the other bytes', () => {
  const cases: Array<[string, string | undefined]> = [
    ['/a', undefined],
    ['/a?', undefined],
    ['/a?x=1', undefined],
    ['/a?subscription-key=k', '/a'],
    ['/a?subscription-key', '/a'],
    ['/a?subscription-key=k&subscription-key=k2', '/a'],
    ['/a?x=1&subscription-key=k', '/a?x=1'],
    ['/a?subscription-key=k&x=%20y+z&subscription-key=k2&y', '/a?x=%20y+z&y'],
    // ; separates for Rack 2, old Python, Go with AllowQuerySemicolons: the key goes with the ; before it.
    ['/a?x=1;subscription-key=k&y=2', '/a?x=1&y=2'],
    ['/a?subscription-key=k;x=1', '/a?x=1'],
    ['/a?q=a;b&x=1', undefined],
    // Empty parameters are bytes of the path like any other: kept.
    ['/a?&&subscription-key=k&', '/a?&&'],
    ['/a?x=%E0%A4%A', undefined],
    // A value may hold anything; only names count.
    ['/a?x=subscription-key', undefined],
    ['/a?x=subscription-key=1', undefined],
  ];
  // Many encoded names and no removed one: kept, whatever the count.
  cases.push([`/a?${Array.from({ length: 5000 }, (_, i) => `%41${i}=1`).join('&')}`, undefined]);
  cases.push([`/a?${Array.from({ length: 5000 }, (_, i) => `%41${i}=1`).join('&')}&subscription%2Dkey=k`, `/a?${Array.from({ length: 5000 }, (_, i) => `%41${i}=1`).join('&')}`]);
  for (const [path, expected] of cases) assert.equal(policy.strip(path), expected, path.slice(0, 80));
  assert.equal(new QueryNamePolicy([]).strip('/a?subscription-key=k'), undefined);
});

test(':path is bytes: bytes above 0x7F and invalid UTF-8 around a removed parameter stay exactly', () => {
  const bytes = Buffer.concat([
    Buffer.from('/caf\xc3\xa9/\xff\xfe?x=\x80\xc0', 'latin1'),
    Buffer.from('&subscription-key=k&y=\xe9%FF', 'latin1'),
  ]);
  const stripped = policy.strip(bytes.toString('latin1'));
  assert.deepEqual(Buffer.from(stripped!, 'latin1'), Buffer.from('/caf\xc3\xa9/\xff\xfe?x=\x80\xc0&y=\xe9%FF', 'latin1'));
  // Non-ASCII bytes in a query send it down the slow path, which still keeps it when nothing matches.
  assert.equal(policy.strip('/\xff?x=\xc3\xa9'), undefined);
});

test('mayMatch: the hot path\'s look lets a plain query through, and sees every suspicious one', () => {
  assert.equal(policy.mayMatch('expand=lines&page=2'), false);
  assert.equal(policy.mayMatch('q=%2F'), true); // any % goes the slow way
  assert.equal(policy.mayMatch('q=\xc5\xbf'), true); // any byte above 0x7F too
  assert.equal(policy.mayMatch('SUBSCRIPTION-KEY=1'), true);
  // Every removed spelling of the table that has neither % nor non-ASCII holds the anchor.
  for (const [, , raw, removed] of RULES) if (removed) assert.equal(policy.mayMatch(`${raw}=1`), true, raw);
  // A name with _ : PHP makes _ out of space, . and [, so the anchor is the longest run without them.
  const underscored = new QueryNamePolicy(['api_key']);
  for (const raw of ['api_key', 'api.key', 'api+key', 'api[key', 'API KEY']) {
    assert.equal(underscored.isRemoved(raw), true, raw);
    assert.equal(underscored.mayMatch(`${raw}=1`), true, raw);
  }
  assert.equal(underscored.isRemoved('api'), false);
  // A name with a dot: qs without allowDots reads `api.key[0]` as `api.key`, PHP as `api_key`.
  const dotted = new QueryNamePolicy(['api.key']);
  for (const raw of ['api.key', 'api.key[0]', '[api.key]', 'api_key', 'api+key']) assert.equal(dotted.isRemoved(raw), true, raw);
  assert.equal(dotted.isRemoved('api'), false);
});

test('normalizedQueryNames and the folds it uses', () => {
  assert.ok(normalizedQueryNames('+Subscription%2DKey[]')!.has('subscription-key'));
  assert.equal(normalizedQueryNames(`x%${'25'.repeat(20)}41`), undefined);
  assert.equal(foldName('ſubscription-\u212Aey'), 'subscription-key');
  assert.equal(foldName('\u0130\u0131'), 'ii');
  assert.equal(foldName('STRASSE'), foldName('strasse'));
  assert.notEqual(foldName('ß'), foldName('ss')); // one char never folds to two
  assert.equal(phpName('  a.b c[x]'), 'a_b_c');
  assert.equal(phpName('a[b'), 'a_b');
  assert.equal(phpName('a\0b'), 'a');
});

test('header names: lower case with _ read as - (CGI, PHP, WSGI: HTTP_OCP_APIM_SUBSCRIPTION_KEY)', () => {
  assert.equal(headerNameKey('Ocp_Apim-Subscription_Key'), 'ocp-apim-subscription-key');
  const headers = new HeaderNamePolicy(['authorization', 'ocp-apim-subscription-key', 'x_api_key']);
  for (const [name, other] of [
    ['ocp_apim_subscription_key', true], ['ocp-apim_subscription-key', true], ['OCP_APIM_SUBSCRIPTION_KEY', true],
    ['x-api-key', true], ['x_api-key', true],
    ['ocp-apim-subscription-key', false], ['x_api_key', false], ['authorization', false], ['ocp-apim-subscription-keys', false],
  ] as const) assert.equal(headers.isOtherSpelling(name), other, name);
  assert.deepEqual(headers.spelled.map((s) => [s.name, s.anchor]), [['ocp-apim-subscription-key', 'subscription'], ['x_api_key', 'api']]);
});

// Spellings built from the rules' pieces, to put to the real parsers.
const NAMES = ['subscription-key', 'Subscription-Key', '%73ubscription-key', 'subscription%2Dkey', '%C5%BFubscription-key'];
const BEFORE = ['', '+', '%20', ' ', '%09', '%00', '[', ']', '.', '!', '%5B', '[]', '++'];
const AFTER = ['', '[]', '[0]', '[x][y]', '%5B%5D', '%00', '%00x', ']', '[', '.x', '+', '%20', '%09', '[]x', ']]x'];
const SPELLINGS = NAMES.flatMap((n) => BEFORE.flatMap((b) => AFTER.map((a) => `${b}${n}${a}`)));

function run(cmd: string, args: string[], input: string): string[][] | undefined {
  const r = spawnSync(cmd, args, { input, encoding: 'utf8', timeout: 60_000 });
  if (r.error !== undefined || r.status !== 0) return undefined;
  return r.stdout.trim().split('\n').map((line) => JSON.parse(line) as string[]);
}

const GO_PROGRAM = `package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"strings"
)

func main() {
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		v, _ := url.ParseQuery(in.Text())
		names := []string{}
		for k := range v {
			names = append(names, strings.ToValidUTF8(k, "?"))
		}
		out, _ := json.Marshal(names)
		fmt.Println(string(out))
	}
}
`;

/** What each parser that runs here reads as the names of `?<spelling>=1`, per spelling. */
const PARSERS: Record<string, (queries: string[]) => string[][] | undefined> = {
  'PHP parse_str': (qs) => run('php', ['-r', 'while (($l = fgets(STDIN)) !== false) { parse_str(rtrim($l, "\\n"), $o); echo json_encode(array_map("strval", array_keys($o)), JSON_INVALID_UTF8_SUBSTITUTE), "\\n"; }'], qs.join('\n') + '\n'),
  'Python parse_qsl': (qs) => run('python3', ['-c', 'import sys, json, urllib.parse as u\nfor l in sys.stdin.read().split("\\n")[:-1]: print(json.dumps([k for k, v in u.parse_qsl(l, keep_blank_values=True)]))'], qs.join('\n') + '\n'),
  'Rack parse_nested_query': (qs) => run('ruby', ['-rrack', '-rjson', '-e', 'STDIN.read.split("\\n").each { |l| k = (Rack::Utils.parse_nested_query(l).keys rescue []); puts JSON.generate(k.map { |x| x.to_s.scrub }) }'], qs.join('\n') + '\n'),
  'Go net/url.ParseQuery': (qs) => {
    const dir = mkdtempSync(join(tmpdir(), 'query-names-go-'));
    try {
      writeFileSync(join(dir, 'main.go'), GO_PROGRAM);
      return run('go', ['run', join(dir, 'main.go')], qs.join('\n') + '\n');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  },
  'Node URLSearchParams': (qs) => qs.map((q) => [...new URLSearchParams(q).keys()]),
  'Node querystring': (qs) => qs.map((q) => Object.keys(querystring.parse(q))),
};

test('every spelling a real parser on this machine reads as subscription-key is removed', (t) => {
  const queries = SPELLINGS.map((s) => `${s}=1`);
  let checked = 0;
  for (const [parser, parse] of Object.entries(PARSERS)) {
    const read = parse(queries);
    if (read === undefined) {
      t.diagnostic(`${parser}: not installed here, skipped`);
      continue;
    }
    checked++;
    const leaks = SPELLINGS.filter((s, i) => read[i]!.includes('subscription-key') && !policy.isRemoved(s));
    assert.deepEqual(leaks, [], `${parser} reads these as subscription-key, and they are kept`);
    const reads = SPELLINGS.filter((_, i) => read[i]!.includes('subscription-key')).length;
    t.diagnostic(`${parser}: ${reads} of ${SPELLINGS.length} spellings read as subscription-key, all removed`);
  }
  assert.ok(checked >= 2, 'at least Node\'s two parsers run');
});
