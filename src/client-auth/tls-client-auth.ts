// tls_client_auth (RFC 8705 §2): the client proves itself with its certificate on the TLS
// connection to the token endpoint; the form carries only client_id (§2.1). Both files are read
// at every fetch; token-connection.ts opens new connections when they change.
import { ClientAuthError } from '../errors.ts';
import type { ClientAuthMethod } from './types.ts';
import { certificateFacts, keyMatchesCertificate, loadCertificate, loadPrivateKey } from './keys.ts';
import { named, readSecret } from './read.ts';

export const tlsClientAuth: ClientAuthMethod = {
  async credentials(profile) {
    const clientId = readSecret(profile, profile.clientId, 'client id');
    const cert = readSecret(profile, profile.certificate, 'certificate');
    const key = readSecret(profile, profile.privateKey, 'private key');
    // Unreadable or empty: SecretReadError from readSecret. Read but unusable: ClientAuthError.
    const certName = named(profile, profile.certificate, 'certificate');
    const keyName = named(profile, profile.privateKey, 'private key');
    let x509;
    let privateKey;
    try {
      x509 = loadCertificate(cert);
    } catch (err) {
      throw new ClientAuthError(`${certName} ${(err as Error).message}`, { cause: err });
    }
    try {
      privateKey = loadPrivateKey(key);
    } catch (err) {
      throw new ClientAuthError(`${keyName} ${(err as Error).message}`, { cause: err });
    }
    if (!keyMatchesCertificate(privateKey, x509)) throw new ClientAuthError(`${keyName} does not match ${certName}`);
    const facts = certificateFacts(x509);
    if (!profile.tokenUrl.startsWith('https:')) throw new ClientAuthError(`profile ${profile.name}: tls_client_auth needs an https tokenUrl`);
    return { form: { client_id: clientId }, headers: {}, tlsClient: { cert, key }, secrets: [key], details: { certificate: facts } };
  },
};
