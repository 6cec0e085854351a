// Pure: which query parameters of a request path are the ones the sidecar removes, and the path
// without them. A parameter goes when any widely used backend framework would read its name as a
// removed one; docs/query-names.md has the table of what each framework does to a raw name and
// how each rule was checked. Every protocol adapter (ext_proc, ext_authz) uses this one rule.
//
// Paths are byte strings here: one char per byte (latin1), so that stripping keeps every other
// byte exactly, bytes above 0x7F and invalid UTF-8 included. Names are compared as text only
// after decoding, the way the frameworks read them.

/** A string holding one byte per char (0x00–0xFF), e.g. `buffer.toString('latin1')`. */
export type ByteString = string;

/** Decoding levels tried; a name still encoded after this many is removed (no client needs it). */
const MAX_DECODE_LEVELS = 8;

/** Whitespace and control characters some framework trims, or an application might. */
const EDGE_JUNK = /^[\s\x00-\x1f\x7f-\x9f\u200b\ufeff]+|[\s\x00-\x1f\x7f-\x9f\u200b\ufeff]+$/g;

/**
 * One char folded the widest way a backend compares names without regard to case: .NET
 * `OrdinalIgnoreCase` (upper-case mapping per UTF-16 unit) and Java `equalsIgnoreCase` (equal
 * upper cases, or equal lower cases of the upper cases). Lower-of-upper covers both, so U+017F
 * (long s) folds to "s", U+212A (Kelvin sign) to "k", U+0131 (dotless i) and U+0130 to "i".
 * Only one-char mappings count: neither runtime maps one char to several when comparing.
 */
function foldChar(c: string): string {
  let upper = c.toUpperCase();
  if (upper.length !== 1) upper = c;
  const lower = upper.toLowerCase();
  if (lower.length === 1) return lower;
  return upper === '\u0130' ? 'i' : upper; // U+0130's simple lower case is "i" (UnicodeData.txt)
}

/** A name folded for comparison (see foldChar); ASCII-only names take the fast way. */
export function foldName(name: string): string {
  if (/^[\x00-\x7f]*$/.test(name)) return name.toLowerCase();
  let out = '';
  for (const c of name) out += c.length === 1 ? foldChar(c) : c;
  return out;
}

/** The chars outside ASCII that foldChar turns into ASCII letters (UnicodeData.txt). */
const FOLDS_TO_ASCII: Record<string, string> = { '\u017f': 's', '\u212a': 'k', '\u0131': 'i', '\u0130': 'i' };

/**
 * foldName as far as ASCII names can tell: the same on every char that folds to ASCII, and one
 * char for one char elsewhere (U+0130, the one char whose lower case is two, is mapped first), so
 * that a long name costs two native passes instead of a loop per char.
 */
function foldForAscii(name: string): string {
  return name.replace(/[\u017f\u212a\u0131\u0130]/g, (c) => FOLDS_TO_ASCII[c]!).toLowerCase();
}

/**
 * One level of percent-decoding as the widest decoder does it: `%XX` to a byte, `%uXXXX` to that
 * UTF-16 unit in UTF-8 (ASP.NET's HttpUtility.UrlDecode), `+` to a space when `plus` is set
 * (form decoding; RFC 3986 decoders keep it). Malformed escapes stay as they are.
 */
function decodeOnce(s: ByteString, plus: boolean): ByteString {
  if (!s.includes('%') && !(plus && s.includes('+'))) return s;
  const out = Buffer.allocUnsafe(s.length); // never longer: 3 or 6 chars make at most 3 bytes
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 0x2b && plus) {
      out[n++] = 0x20;
    } else if (c === 0x25 && (s.charCodeAt(i + 1) | 0x20) === 0x75 && isHex(s, i + 2, 4)) {
      n += out.write(String.fromCharCode(parseInt(s.slice(i + 2, i + 6), 16)), n, 'utf8');
      i += 5;
    } else if (c === 0x25 && isHex(s, i + 1, 2)) {
      out[n++] = parseInt(s.slice(i + 1, i + 3), 16);
      i += 2;
    } else {
      out[n++] = c;
    }
  }
  return out.toString('latin1', 0, n);
}

function isHex(s: string, from: number, count: number): boolean {
  if (from + count > s.length) return false;
  for (let i = from; i < from + count; i++) {
    const code = s.charCodeAt(i);
    if (!((code >= 0x30 && code <= 0x39) || (code >= 0x41 && code <= 0x46) || (code >= 0x61 && code <= 0x66))) return false;
  }
  return true;
}

/** Bytes read as UTF-8 text, invalid sequences as U+FFFD (which matches no name). */
function utf8(bytes: ByteString): string {
  return /^[\x00-\x7f]*$/.test(bytes) ? bytes : Buffer.from(bytes, 'latin1').toString('utf8');
}

/**
 * PHP's variable name, as php 8.2's parse_str (the code behind $_GET) was seen to read it: cut
 * at the first NUL, leading spaces dropped, an array suffix `[...]` dropped, and space, `.` and
 * an unmatched `[` turned into `_`.
 */
export function phpName(name: string): string {
  let s = name;
  const nul = s.indexOf('\0');
  if (nul >= 0) s = s.slice(0, nul);
  s = s.replace(/^ +/, '');
  const open = s.indexOf('[');
  if (open >= 0 && s.indexOf(']', open + 1) > open) s = s.slice(0, open);
  return s.replace(/[ .[]/g, '_');
}

/**
 * The name before nesting syntax: leading `[`, `]` dropped (Rack 2, qs), then cut at the first
 * `[` or `]` (array and hash suffixes in PHP, Rack, qs, ASP.NET and Spring binding); with `dots`,
 * `.` counts as nesting too (qs `allowDots`, ASP.NET and Spring property paths).
 */
function baseName(name: string, dots: boolean): string {
  const s = name.replace(dots ? /^[[\].]+/ : /^[[\]]+/, '');
  const cut = s.search(dots ? /[[\].]/ : /[[\]]/);
  return cut < 0 ? s : s.slice(0, cut);
}

/** Every text, folded, that some framework could read for one decoded name. */
function readingsOf(text: string, into: Set<string>, fold: (name: string) => string): void {
  const nul = text.indexOf('\0');
  for (const s of nul >= 0 ? [text, text.slice(0, nul)] : [text]) {
    const trimmed = s.replace(EDGE_JUNK, '');
    into.add(fold(s));
    into.add(fold(trimmed));
    into.add(fold(phpName(s)));
    // Spring's WebDataBinder reads `!name` as a default value for `name`.
    for (const t of trimmed.startsWith('!') ? [trimmed, trimmed.slice(1)] : [trimmed]) {
      into.add(fold(t));
      into.add(fold(baseName(t, false).replace(EDGE_JUNK, '')));
      into.add(fold(baseName(t, true).replace(EDGE_JUNK, '')));
    }
  }
}

/**
 * The texts a raw name decodes to, level by level (as sent, then decoded once more each time),
 * with `+` as a space and without; `undefined` last when it is still encoded after
 * MAX_DECODE_LEVELS levels.
 */
function* decodedLevels(rawName: ByteString): Generator<string | undefined> {
  let sawPlus = false;
  for (const plus of [true, false]) {
    // Without a `+` at any level, keeping `+` gives the same texts again.
    if (!plus && !sawPlus) return;
    let level = rawName;
    for (let depth = 0; ; depth++) {
      if (plus && level.includes('+')) sawPlus = true;
      if (plus || depth > 0) yield utf8(level); // level 0 is the same text in both
      const next = decodeOnce(level, plus);
      if (next === level) break;
      if (depth === MAX_DECODE_LEVELS) {
        yield undefined;
        return;
      }
      level = next;
    }
  }
}

/**
 * Every name, folded, that a framework of docs/query-names.md could read for this raw name (the
 * bytes before the first `=` of one parameter), or undefined when the name is still
 * percent-encoded after MAX_DECODE_LEVELS levels (then it is treated as removed).
 */
export function normalizedQueryNames(rawName: ByteString): Set<string> | undefined {
  const names = new Set<string>();
  for (const text of decodedLevels(rawName)) {
    if (text === undefined) return undefined;
    readingsOf(text, names, foldName);
  }
  return names;
}

/** Past this length, a decoded name that holds an anchor is removed without reading it further. */
const MAX_READ_NAME_LENGTH = 1024;

/** The longest stretch of a folded target without `_`, space, `.`, `[` (what PHP makes `_` of). */
function anchorOf(target: string): string {
  return target.split(/[_ .[]/).reduce((a, b) => (b.length > a.length ? b : a), '');
}

/** The removal rule for one profile's `removeQueryParameters`, compiled once. */
export class QueryNamePolicy {
  /** The folded names a removed parameter may be read as: each name and its PHP spelling. */
  private readonly targets: ReadonlySet<string>;
  /**
   * Per target, the stretch every reading equal to it holds, and so every decoded text it comes
   * from, folded: no rule makes these chars out of others (PHP makes `_` out of space, `.` and
   * `[`). Also what a raw query without `%` or non-ASCII bytes must contain, ASCII case aside,
   * for the hot path to look further.
   */
  private readonly anchors: readonly string[];
  private readonly fold: (name: string) => string;
  /** No reading is longer than the raw name it comes from: shorter ones than this never match. */
  private readonly shortest: number;
  readonly empty: boolean;

  constructor(names: readonly string[]) {
    const targets = [...new Set(names.flatMap((n) => [foldName(n), foldName(phpName(n))]))];
    this.targets = new Set(targets);
    this.anchors = [...new Set(targets.map(anchorOf))];
    this.shortest = Math.min(...targets.map((t) => t.length));
    this.fold = targets.every((t) => /^[\x00-\x7f]*$/.test(t)) ? foldForAscii : foldName;
    this.empty = names.length === 0;
  }

  /**
   * True when some framework would read this raw parameter name as a removed one. Only decoded
   * texts that hold an anchor are read all the ways of readingsOf: a query of many or long names
   * stays cheap.
   */
  isRemoved(rawName: ByteString): boolean {
    if (rawName.length < this.shortest) return false;
    const readings = new Set<string>();
    for (const text of decodedLevels(rawName)) {
      if (text === undefined) return true;
      if (!this.holdsAnchor(text)) continue;
      if (text.length > MAX_READ_NAME_LENGTH) return true;
      readingsOf(text, readings, this.fold);
      for (const r of readings) if (this.targets.has(r)) return true;
      readings.clear();
    }
    return false;
  }

  private holdsAnchor(text: string): boolean {
    const folded = this.fold(text);
    for (const a of this.anchors) if (folded.includes(a)) return true;
    return false;
  }

  /**
   * False when no decoding level of the whole query holds an anchor: then no parameter in it
   * can be a removed one (an escape never spans a separator, so each name's levels are pieces of
   * the query's), and a query of many encoded names is not split at all.
   */
  private queryHoldsAnchor(query: ByteString): boolean {
    for (const text of decodedLevels(query)) if (text === undefined || this.holdsAnchor(text)) return true;
    return false;
  }

  /**
   * The hot path's look at a query: false means no parameter in it can be a removed one, so the
   * path needs no rewrite. A `%`, a byte above 0x7F or any anchor (ASCII case aside) means maybe.
   */
  mayMatch(query: ByteString): boolean {
    if (this.empty) return false;
    let upper = false;
    for (let i = 0; i < query.length; i++) {
      const c = query.charCodeAt(i);
      if (c === 0x25 || c > 0x7f) return true;
      if (c >= 0x41 && c <= 0x5a) upper = true;
    }
    const text = upper ? query.toLowerCase() : query;
    for (const anchor of this.anchors) if (text.includes(anchor)) return true;
    return false;
  }

  /**
   * The path without the removed parameters, or undefined when none is there. Parameters are
   * split at `&` and at `;` (a separator for Rack 2, Python before 3.9.2, Go with
   * AllowQuerySemicolons); a removed one goes with the separator before it (after it, when it
   * comes first). Every other byte stays as it was; a query left empty loses its `?`.
   */
  strip(path: ByteString): ByteString | undefined {
    const q = path.indexOf('?');
    if (q < 0 || this.empty) return undefined;
    const query = path.slice(q + 1);
    if (!this.mayMatch(query) || !this.queryHoldsAnchor(query)) return undefined;
    let out = path.slice(0, q + 1);
    let kept = 0;
    let removed = false;
    let start = q + 1;
    let separator = '';
    for (let i = start; i <= path.length; i++) {
      const c = path[i];
      if (i < path.length && c !== '&' && c !== ';') continue;
      const piece = path.slice(start, i);
      const eq = piece.indexOf('=');
      if (this.isRemoved(eq < 0 ? piece : piece.slice(0, eq))) {
        removed = true;
      } else {
        out += (kept > 0 ? separator : '') + piece;
        kept++;
      }
      separator = c ?? '';
      start = i + 1;
    }
    if (!removed) return undefined;
    return out.length === q + 1 ? path.slice(0, q) : out;
  }
}
