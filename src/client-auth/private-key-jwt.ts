// private_key_jwt (RFC 7523 §2.2, OpenID Connect Core §9): a JWT signed with our private key
// as client_assertion. Key and certificate are read at every fetch, so a rotated pair is used
// by the next token request without a restart.
import { randomUUID } from 'node:crypto';
import { SignJWT, type JWTHeaderParameters } from 'jose';
import { ClientAuthError } from '../errors.ts';
import type { ClientAuthMethod } from './types.ts';
import { JWT_BEARER_ASSERTION } from './jwt-bearer.ts';
import { algorithmMismatch, certificateFacts, defaultAlgorithm, keyMatchesCertificate, loadCertificate, loadPrivateKey } from './keys.ts';
import { named, readSecret } from './read.ts';

export const DEFAULT_ASSERTION_LIFETIME_SECONDS = 300;

export const privateKeyJwt: ClientAuthMethod = {
  async credentials(profile, now) {
    const clientId = readSecret(profile, profile.clientId, 'client id');
    // Unreadable or empty: SecretReadError from readSecret. Read but unusable: ClientAuthError.
    const pem = readSecret(profile, profile.privateKey, 'private key');
    const keyName = named(profile, profile.privateKey, 'private key');
    const key = parseOr(() => loadPrivateKey(pem), keyName);
    const algorithm = profile.assertion?.algorithm ?? defaultAlgorithm(key);
    const mismatch = algorithm === undefined ? `${key.asymmetricKeyType ?? 'this'} keys cannot sign an assertion` : algorithmMismatch(algorithm, key);
    if (algorithm === undefined || mismatch !== undefined) throw new ClientAuthError(`${keyName} does not fit: ${mismatch}`);

    const header: JWTHeaderParameters = { alg: algorithm, typ: 'JWT' };
    if (profile.keyId !== undefined) header.kid = profile.keyId;
    const details: Record<string, unknown> = {};
    if (profile.certificate !== undefined) {
      const certPem = readSecret(profile, profile.certificate, 'certificate');
      const certName = named(profile, profile.certificate, 'certificate');
      const cert = parseOr(() => loadCertificate(certPem), certName);
      if (!keyMatchesCertificate(key, cert)) {
        throw new ClientAuthError(`${keyName} does not match ${certName}, which is for ${cert.subject.replace(/\n/g, ', ')}`);
      }
      const facts = certificateFacts(cert);
      // Entra's certificate credentials find the key by these (RFC 7515 §4.1.7-8).
      header['x5t#S256'] = facts.x5tS256;
      header.x5t = facts.x5t;
      details.certificate = facts;
    }

    const iat = Math.floor(now / 1000);
    const claims = {
      iss: clientId,
      sub: clientId,
      aud: profile.assertion?.audience ?? profile.tokenUrl,
      // A fresh jti per assertion: servers reject a replayed one (OIDC Core §9).
      jti: randomUUID(),
      iat,
      nbf: iat,
      exp: iat + (profile.assertion?.lifetimeSeconds ?? DEFAULT_ASSERTION_LIFETIME_SECONDS),
    };
    const assertion = await new SignJWT(claims).setProtectedHeader(header).sign(key);
    details.assertion = { header, claims };
    return {
      form: { client_id: clientId, client_assertion_type: JWT_BEARER_ASSERTION, client_assertion: assertion },
      headers: {},
      secrets: [assertion],
      details,
    };
  },
};

/** `name` is what was read ("the private key of profile default (/keys/key.pem)"); the message says why it is unusable. */
function parseOr<T>(parse: () => T, name: string): T {
  try {
    return parse();
  } catch (err) {
    throw new ClientAuthError(`${name} ${(err as Error).message}`, { cause: err });
  }
}
