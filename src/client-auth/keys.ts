// Private keys and certificates as people have them (PEM: PKCS#8, PKCS#1 RSA, SEC1 EC), read
// with node:crypto, and the facts a JWT header or a log may carry about them (thumbprints).
import { createHash, createPrivateKey, X509Certificate, type KeyObject } from 'node:crypto';

export const ASSERTION_ALGORITHMS = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512'] as const;
export type AssertionAlgorithm = (typeof ASSERTION_ALGORITHMS)[number];

const CURVE_ALGORITHM: Record<string, AssertionAlgorithm> = { prime256v1: 'ES256', secp384r1: 'ES384', secp521r1: 'ES512' };

/** Parses a PEM private key. The error names the form, never the key's bytes. */
export function loadPrivateKey(pem: string): KeyObject {
  try {
    return createPrivateKey({ key: pem, format: 'pem' });
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    throw new Error(`is not a PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC; encrypted keys are not supported)${typeof code === 'string' ? ` (${code})` : ''}`, { cause: err });
  }
}

export function loadCertificate(pem: string): X509Certificate {
  try {
    return new X509Certificate(pem);
  } catch (err) {
    throw new Error('is not a PEM certificate', { cause: err });
  }
}

/** RS256 for RSA, ES256/384/512 for the P-256/384/521 curves; undefined for other key types. */
export function defaultAlgorithm(key: KeyObject): AssertionAlgorithm | undefined {
  if (key.asymmetricKeyType === 'rsa') return 'RS256';
  if (key.asymmetricKeyType === 'ec') return CURVE_ALGORITHM[key.asymmetricKeyDetails?.namedCurve ?? ''];
  return undefined;
}

/** Why `algorithm` cannot sign with `key`, or undefined when it can. */
export function algorithmMismatch(algorithm: AssertionAlgorithm, key: KeyObject): string | undefined {
  const type = key.asymmetricKeyType;
  if (algorithm.startsWith('RS') || algorithm.startsWith('PS')) {
    return type === 'rsa' ? undefined : `${algorithm} needs an RSA key, this is ${describeKey(key)}`;
  }
  return type === 'ec' && CURVE_ALGORITHM[key.asymmetricKeyDetails?.namedCurve ?? ''] === algorithm
    ? undefined
    : `${algorithm} needs an EC key on ${Object.entries(CURVE_ALGORITHM).find(([, a]) => a === algorithm)?.[0]}, this is ${describeKey(key)}`;
}

function describeKey(key: KeyObject): string {
  const d = key.asymmetricKeyDetails;
  if (key.asymmetricKeyType === 'rsa') return `an RSA key (${d?.modulusLength ?? '?'} bits)`;
  if (key.asymmetricKeyType === 'ec') return `an EC key (${d?.namedCurve ?? '?'})`;
  return `a ${key.asymmetricKeyType ?? 'unknown'} key`;
}

export interface CertificateFacts {
  subject: string;
  issuer: string;
  notAfter: string;
  /** base64url SHA-256 of the DER certificate: the JWT header's `x5t#S256` (RFC 7515 §4.1.8). */
  x5tS256: string;
  /** base64url SHA-1 of the DER certificate: `x5t`, what Entra shows as the thumbprint (in hex). */
  x5t: string;
  /** The SHA-1 thumbprint in hex, as the Entra portal and `openssl x509 -fingerprint` print it. */
  sha1Hex: string;
}

export function certificateFacts(cert: X509Certificate): CertificateFacts {
  const sha1 = createHash('sha1').update(cert.raw).digest();
  return {
    subject: cert.subject.replace(/\n/g, ', '),
    issuer: cert.issuer.replace(/\n/g, ', '),
    notAfter: new Date(cert.validTo).toISOString(),
    x5tS256: createHash('sha256').update(cert.raw).digest('base64url'),
    x5t: sha1.toString('base64url'),
    sha1Hex: sha1.toString('hex').toUpperCase(),
  };
}

/** Does the certificate carry the public half of this private key? */
export function keyMatchesCertificate(key: KeyObject, cert: X509Certificate): boolean {
  return cert.checkPrivateKey(key);
}

/** Every certificate in a PEM bundle (a CA file often holds several). */
export function pemCertificates(pem: string): string[] {
  return pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
}
