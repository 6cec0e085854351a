// client_secret_basic (RFC 6749 §2.3.1): HTTP Basic with id and secret form-encoded first.
import { formEncode } from '../form-encoding.ts';
import type { ClientAuthMethod } from './types.ts';
import { readSecret } from './read.ts';

export const clientSecretBasic: ClientAuthMethod = {
  async credentials(profile) {
    const clientId = readSecret(profile, profile.clientId, 'client id');
    const clientSecret = readSecret(profile, profile.clientSecret, 'client secret');
    // Form-encoded (space as '+') before the Basic encoding, so ':' in the id and '%', '+', '&'
    // in the secret survive the round trip.
    const pair = `${formEncode(clientId)}:${formEncode(clientSecret)}`;
    return {
      form: {},
      headers: { authorization: `Basic ${Buffer.from(pair, 'utf8').toString('base64')}` },
      // Raw values: the response parser derives every encoding (the Basic pair's base64 too).
      secrets: [clientSecret, pair],
      details: {},
    };
  },
};
