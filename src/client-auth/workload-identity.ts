// workload_identity: a token the platform issues to this workload (a Kubernetes projected
// service-account token, as AKS Workload Identity mounts it) is the client assertion of a
// federated credential (RFC 7523 §2.2). The kubelet rotates the file: read it at every fetch.
import type { ClientAuthMethod } from './types.ts';
import { decodeJwtParts } from '../jwt-parts.ts';
import { JWT_BEARER_ASSERTION } from './jwt-bearer.ts';
import { readSecret, readTokenFile } from './read.ts';

export const workloadIdentity: ClientAuthMethod = {
  async credentials(profile) {
    const clientId = readSecret(profile, profile.clientId, 'client id');
    const path = profile.tokenFile ?? '';
    const assertion = readTokenFile(profile, path);
    const decoded = decodeJwtParts(assertion);
    return {
      form: { client_id: clientId, client_assertion_type: JWT_BEARER_ASSERTION, client_assertion: assertion },
      headers: {},
      secrets: [assertion],
      details: { tokenFile: path, assertion: decoded ?? 'not a JWT' },
    };
  },
};
