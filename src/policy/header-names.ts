// Pure: which request headers are spellings of the ones the sidecar removes or overwrites.
// CGI, PHP and WSGI servers hand a header to the application as HTTP_<NAME>, upper-cased with
// `-` turned into `_` (RFC 3875 §4.1.18), so `ocp_apim_subscription_key` reaches a PHP backend as
// HTTP_OCP_APIM_SUBSCRIPTION_KEY, the key itself. Every protocol adapter uses this one rule.

/** A header name as CGI-style servers compare it: lower case, `_` read as `-`. */
export function headerNameKey(name: string): string {
  return name.toLowerCase().replace(/_/g, '-');
}

/** One name that has other spellings, with what a byte scan needs to find them. */
export interface SpelledName {
  /** The name as configured (lower case): already removed or overwritten as such. */
  readonly name: string;
  /** headerNameKey(name). */
  readonly key: string;
  /** The longest stretch of `key` without `-`, and where it starts: every spelling holds it there. */
  readonly anchor: string;
  readonly anchorAt: number;
}

/** The header rule for one profile, compiled once from the names it removes or overwrites. */
export class HeaderNamePolicy {
  /** Names with a `-` or `_`, the only ones that have other spellings. */
  readonly spelled: readonly SpelledName[];
  private readonly keys: ReadonlySet<string>;
  private readonly exact: ReadonlySet<string>;

  constructor(names: readonly string[]) {
    const lower = [...new Set(names.map((n) => n.toLowerCase()))];
    this.exact = new Set(lower);
    this.keys = new Set(lower.map(headerNameKey));
    this.spelled = lower.filter((n) => /[-_]/.test(n)).map((name) => {
      const key = headerNameKey(name);
      const anchor = key.split('-').reduce((a, b) => (b.length > a.length ? b : a), '');
      return { name, key, anchor, anchorAt: key.indexOf(anchor) };
    });
  }

  /** True for a header name that is another spelling of a removed or overwritten one. */
  isOtherSpelling(headerName: string): boolean {
    const lower = headerName.toLowerCase();
    return !this.exact.has(lower) && this.keys.has(headerNameKey(lower));
  }

  /** The other spellings among these header names, each once, as sent. */
  otherSpellings(headerNames: Iterable<string>): string[] {
    const found = new Set<string>();
    for (const h of headerNames) if (this.isOtherSpelling(h)) found.add(h.toLowerCase());
    return [...found];
  }
}
