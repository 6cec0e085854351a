// tls_client_auth (RFC 8705 §2): the client proves itself with its certificate on the TLS
// connection to the token endpoint; the form carries only client_id (§2.1). Both files are read
// at every fetch; token-connection.ts opens new connections when they change.
import { SecretReadError } from '../errors.ts';
import type { ClientAuthMethod } from './index.ts';
import { certificateFacts, keyMatchesCertificate, loadCertificate, loadPrivateKey } from './keys.ts';
import { readSecret } from './read.ts';

export const tlsClientAuth: ClientAuthMethod = {
  async credentials(profile) {
    const clientId = readSecret(profile, profile.clientId, 'client id');
    const cert = readSecret(profile, profile.certificate, 'certificate');
    const key = readSecret(profile, profile.privateKey, 'private key');
    let facts;
    try {
      const x509 = loadCertificate(cert);
      if (!keyMatchesCertificate(loadPrivateKey(key), x509)) throw new Error('does not match the certificate');
      facts = certificateFacts(x509);
    } catch (err) {
      throw new SecretReadError(`the certificate and private key of profile ${profile.name} are not usable: ${(err as Error).message}`, { cause: err });
    }
    if (!profile.tokenUrl.startsWith('https:')) throw new SecretReadError(`profile ${profile.name}: tls_client_auth needs an https tokenUrl`);
    return { form: { client_id: clientId }, headers: {}, tlsClient: { cert, key }, secrets: [key], details: { certificate: facts } };
  },
};
