import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseConfig } from '../../src/config.ts';
import { continueWithoutToken, injectToken } from '../../src/protocols/ext-proc-mutation.ts';
import type { Token } from '../../src/token.ts';

const profile = parseConfig(`
profiles:
  default: { tokenUrl: 'https://idp.test/token', clientId: a, clientSecret: b, removeHeaders: [x-api-key] }
`, { env: {} }).profiles.default!;
const token: Token = { accessToken: 'abc', tokenType: 'Bearer', obtainedAt: 0, expiresAt: 1, refreshInSeconds: undefined };
const option = (key: string, raw: Buffer) => ({ header: { key, raw_value: raw }, append_action: 'OVERWRITE_IF_EXISTS_OR_ADD' });

test('a request\'s changes: :path written back as the same bytes (above 0x7F, invalid UTF-8), other spellings removed too', () => {
  const bytes = Buffer.from([0x2f, 0xc3, 0xa9, 0xff, 0x3f, 0x61, 0x3d, 0x80]); // "/é\xff?a=\x80"
  const path = bytes.toString('latin1');
  assert.deepEqual(injectToken(profile, token, { path, removeHeaders: ['ocp_apim_subscription_key'] }), {
    request_headers: {
      response: {
        header_mutation: {
          set_headers: [option('authorization', Buffer.from('Bearer abc')), option(':path', bytes)],
          remove_headers: ['ocp-apim-subscription-key', 'x-api-key', 'ocp_apim_subscription_key'],
        },
      },
    },
  });
  assert.deepEqual(continueWithoutToken(profile, { path, removeHeaders: ['x_api_key'] }), {
    request_headers: {
      response: {
        header_mutation: {
          remove_headers: ['authorization', 'ocp-apim-subscription-key', 'x-api-key', 'x_api_key'],
          set_headers: [option(':path', bytes)],
        },
      },
    },
  });
});

test('without changes, the answers are the profile\'s own (what is prebuilt per token)', () => {
  assert.deepEqual(injectToken(profile, token), {
    request_headers: {
      response: { header_mutation: { set_headers: [option('authorization', Buffer.from('Bearer abc'))], remove_headers: ['ocp-apim-subscription-key', 'x-api-key'] } },
    },
  });
  assert.deepEqual(continueWithoutToken(profile), {
    request_headers: { response: { header_mutation: { remove_headers: ['authorization', 'ocp-apim-subscription-key', 'x-api-key'] } } },
  });
});
