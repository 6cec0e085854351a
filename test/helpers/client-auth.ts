// What the client-authentication tests do around a fetch: a TokenSource that is closed after
// the test's steps, whether they passed or threw (it holds a dispatcher with open sockets).
import type { ProfileConfig } from '../../src/config.ts';
import { TokenSource, type TokenSourceOptions } from '../../src/token-source.ts';

/** Runs `steps` with a TokenSource on `profile`, then closes it, whatever `steps` did. */
export async function withSource<T>(profile: ProfileConfig, steps: (source: TokenSource) => Promise<T>, options: TokenSourceOptions = {}): Promise<T> {
  const source = new TokenSource(profile, options);
  try {
    return await steps(source);
  } finally {
    await source.close();
  }
}
