// How a client proves who it is to the token endpoint: one module per `clientAuth` method, all
// behind the one interface in types.ts, so a new method is a new file and a line in the table.
// token-source.ts does the HTTP exchange with whatever a method returns.
import type { ClientAuth } from '../config-types.ts';
import { clientSecretBasic } from './client-secret-basic.ts';
import { clientSecretPost } from './client-secret-post.ts';
import { managedIdentity } from './managed-identity.ts';
import { privateKeyJwt } from './private-key-jwt.ts';
import { tlsClientAuth } from './tls-client-auth.ts';
import type { ClientAuthMethod } from './types.ts';
import { workloadIdentity } from './workload-identity.ts';

export type { ClientAuthMethod, Credentials, Exchange } from './types.ts';

export const clientAuthMethods: Readonly<Record<ClientAuth, ClientAuthMethod>> = {
  client_secret_post: clientSecretPost,
  client_secret_basic: clientSecretBasic,
  private_key_jwt: privateKeyJwt,
  tls_client_auth: tlsClientAuth,
  workload_identity: workloadIdentity,
  managed_identity: managedIdentity,
};
