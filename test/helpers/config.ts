// Config for tests: a whole ProfileConfig made by hand, for code that takes one without a config
// file (TokenSource, TokenCache), and the problems a config text is refused with.
import assert from 'node:assert/strict';
import { parseConfig, type LoadOptions, type ProfileConfig, type RefreshConfig, type SecretValue } from '../../src/config.ts';
import { ConfigError } from '../../src/errors.ts';

export type ProfileOverrides = Partial<Omit<ProfileConfig, 'refresh'>> & { refresh?: Partial<RefreshConfig> };

/** A value that is always `value`, as a literal in the config file would be. */
export const fixed = (value: string): SecretValue => ({ read: () => value });

/**
 * A client_secret_post profile with the defaults parseConfig gives, except jitter 0 (refresh
 * moments are exact) and a tokenUrl nothing listens on. `overrides` replace whole fields, but
 * `refresh` key by key.
 */
export function testProfile(overrides: ProfileOverrides = {}): ProfileConfig {
  const { refresh, ...rest } = overrides;
  return {
    name: 'default',
    tokenUrl: 'http://127.0.0.1:9/token',
    clientId: fixed('test-client'),
    clientSecret: fixed('test-secret'),
    clientAuth: 'client_secret_post',
    scope: undefined,
    resource: undefined,
    audience: undefined,
    extraParams: {},
    timeoutMs: 20_000,
    maxTokenBytes: 16_384,
    header: 'authorization',
    removeHeaders: ['ocp-apim-subscription-key'],
    removeQueryParameters: ['subscription-key'],
    onFailure: 'deny',
    failureStatus: 503,
    ...rest,
    refresh: { share: 0.5, jitter: 0, marginSeconds: 30, minBackoffSeconds: 1, maxBackoffSeconds: 60, onBackendStatus: [], ...refresh },
  };
}

/** The problems parseConfig refuses `text` with, as `path: message`; fails when it accepts it. */
export function configProblems(text: string, options: LoadOptions): string[] {
  try {
    parseConfig(text, options);
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected ConfigError, got ${err}`);
    return err.problems.map((p) => `${p.path}: ${p.message}`);
  }
  assert.fail('expected the config to be rejected');
}
