// Reading what a method sends, at fetch time: `${file:}` values and token files rotate under a
// running pod, so nothing here is cached. A failure is a coded SecretReadError naming what and
// where, never the value.
import { readFileSync } from 'node:fs';
import type { ProfileConfig, SecretValue } from '../config-types.ts';
import { SecretReadError } from '../errors.ts';

export function readSecret(profile: ProfileConfig, value: SecretValue | undefined, what: string): string {
  if (value === undefined) throw new SecretReadError(`profile ${profile.name} has no ${what}`);
  const from = value.source === undefined ? '' : ` (${value.source})`;
  let s: string;
  try {
    s = value.read();
  } catch (err) {
    const code = (err as NodeJS.ErrnoException | null)?.code;
    const why = [value.source, code].filter((x) => x !== undefined && x !== '').join(': ');
    throw new SecretReadError(`cannot read the ${what} of profile ${profile.name}${why === '' ? '' : ` (${why})`}`, { cause: err });
  }
  if (s === '') throw new SecretReadError(`the ${what} of profile ${profile.name}${from} is empty`);
  return s;
}

/** What a value read fine but cannot be used is called in an error: by where it is, never its content. */
export function named(profile: ProfileConfig, value: SecretValue | undefined, what: string): string {
  return `the ${what} of profile ${profile.name}${value?.source === undefined ? '' : ` (${value.source})`}`;
}

/** A file whose whole content is the credential (a projected service-account token). */
export function readTokenFile(profile: ProfileConfig, path: string): string {
  let s: string;
  try {
    s = readFileSync(path, 'utf8').trim();
  } catch (err) {
    const code = (err as NodeJS.ErrnoException | null)?.code;
    throw new SecretReadError(`cannot read the token file ${path} of profile ${profile.name}${code ? ` (${code})` : ''}`, { cause: err });
  }
  if (s === '') throw new SecretReadError(`the token file ${path} of profile ${profile.name} is empty`);
  return s;
}
