// RFC 7523 §2.2: a JWT as client authentication (private_key_jwt, workload_identity).

/** The client_assertion_type of a JWT used as client authentication. */
export const JWT_BEARER_ASSERTION = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
