// client_secret_post (RFC 6749 §2.3.1): id and secret in the form body.
import type { ClientAuthMethod } from './types.ts';
import { readSecret } from './read.ts';

export const clientSecretPost: ClientAuthMethod = {
  async credentials(profile) {
    const clientId = readSecret(profile, profile.clientId, 'client id');
    const clientSecret = readSecret(profile, profile.clientSecret, 'client secret');
    return { form: { client_id: clientId, client_secret: clientSecret }, headers: {}, secrets: [clientSecret], details: {} };
  },
};
