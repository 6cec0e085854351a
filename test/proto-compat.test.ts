// The trimmed protos in proto/ must be wire-compatible with Envoy's own: same method path,
// byte-identical encodings of what the sidecar sends, and Envoy-encoded requests read correctly.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { loadSync } from '@grpc/proto-loader';
import { deny, continueWithoutToken, emptyReply, injectToken } from '../src/protocols/ext-proc-mutation.ts';
import { encodeResponse, findPath, peekRequest, PROCESS_PATH, PROTO_FILE, REQUEST_KIND_NAMES, decodeRequest } from '../src/protocols/ext-proc-wire.ts';
import { parseConfig } from '../src/config.ts';
import { requestHeaders, TYPICAL_HEADERS, upstreamMethod } from './helpers/extproc-client.ts';
import { loadService, LOADER_OPTIONS, messageType, packAny, PROTO_DIR } from '../src/protocols/wire.ts';
import { peekCheck } from '../src/protocols/ext-authz-wire.ts';
import { decodeSecret, upstreamSecretType, upstreamService } from './helpers/xds-client.ts';

const ours = (loadSync(PROTO_FILE, { ...LOADER_OPTIONS, includeDirs: [PROTO_DIR] })['envoy.service.ext_proc.v3.ExternalProcessor'] as any).Process;
const upstream = upstreamMethod();

const profile = parseConfig(`
profiles:
  default:
    tokenUrl: https://login.example.test/token
    clientId: id
    clientSecret: secret
    removeHeaders: [x-api-key]
`).profiles.default!;
const token = {
  accessToken: 'eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhLWIuYyJ9.c2ln-_x', // '.', '-', '_': would break as base64
  tokenType: 'Bearer',
  obtainedAt: 0,
  expiresAt: 3_600_000,
  refreshInSeconds: undefined,
};

test('the method path is the one Envoy calls', () => {
  assert.equal(PROCESS_PATH, '/envoy.service.ext_proc.v3.ExternalProcessor/Process');
  assert.equal(ours.path, upstream.path);
  assert.equal(ours.requestStream, true);
  assert.equal(ours.responseStream, true);
});

const replies = {
  inject: injectToken(profile, token),
  allow: continueWithoutToken(profile),
  deny: deny(503, 'noToken', 'default'),
  ...Object.fromEntries(REQUEST_KIND_NAMES.map((k) => [`empty ${k}`, emptyReply(k)])),
};

for (const [name, reply] of Object.entries(replies)) {
  test(`reply "${name}" encodes to the same bytes with the upstream protos and decodes back`, () => {
    const mine = encodeResponse(reply);
    const theirs = upstream.responseSerialize(reply);
    assert.deepEqual(mine, Buffer.from(theirs));
    const decoded = upstream.responseDeserialize(mine);
    assert.equal(decoded.response, Object.keys(reply)[0]);
  });
}

test('the token reply, decoded by upstream, is exactly the two mutations with raw_value bytes only', () => {
  const decoded = upstream.responseDeserialize(encodeResponse(replies.inject));
  assert.deepEqual(decoded, {
    response: 'request_headers',
    request_headers: {
      response: {
        header_mutation: {
          set_headers: [{
            header: { key: 'authorization', raw_value: Buffer.from(`Bearer ${token.accessToken}`) },
            append_action: 'OVERWRITE_IF_EXISTS_OR_ADD',
          }],
          remove_headers: ['ocp-apim-subscription-key', 'x-api-key'],
        },
      },
    },
  });
});

test('the deny reply carries its status, JSON content type and a body naming the profile', () => {
  const decoded = upstream.responseDeserialize(encodeResponse(replies.deny));
  assert.deepEqual(decoded, {
    response: 'immediate_response',
    immediate_response: {
      status: { code: 'ServiceUnavailable' },
      headers: {
        set_headers: [
          { header: { key: 'content-type', raw_value: Buffer.from('application/json') }, append_action: 'OVERWRITE_IF_EXISTS_OR_ADD' },
          { header: { key: 'cache-control', raw_value: Buffer.from('no-store') }, append_action: 'OVERWRITE_IF_EXISTS_OR_ADD' },
        ],
      },
      body: Buffer.from(JSON.stringify({ error: 'OAUTH2_ERR_NO_TOKEN', message: 'no usable access token for this profile', profile: 'default' })),
      details: 'oauth2_extproc_oauth2_err_no_token',
    },
  });
});

test('every upstream-encoded request kind is recognised, and headers decode from raw_value', () => {
  for (const kind of REQUEST_KIND_NAMES) {
    const message = kind.endsWith('headers')
      ? { [kind]: { headers: { headers: [{ key: 'a', raw_value: Buffer.from('b') }] }, end_of_stream: true } }
      : kind.endsWith('body') ? { [kind]: { body: Buffer.from('ignored'), end_of_stream: true } }
        : { [kind]: { trailers: { headers: [{ key: 'grpc-status', raw_value: Buffer.from('0') }] } } };
    const bytes = Buffer.from(upstream.requestSerialize({ ...message, observability_mode: false }));
    assert.equal(peekRequest(bytes).kind, kind);
  }
  const bytes = Buffer.from(upstream.requestSerialize(requestHeaders(TYPICAL_HEADERS)));
  const decoded = decodeRequest(bytes);
  assert.equal(decoded.request, 'request_headers');
  assert.deepEqual(
    decoded.request_headers.headers.headers.map((h: any) => [h.key, Buffer.from(h.raw_value).toString()]),
    TYPICAL_HEADERS,
  );
});

test('fields from a newer Envoy (attributes, metadata_context, protocol_config) are skipped', () => {
  const bytes = Buffer.from(upstream.requestSerialize({
    ...requestHeaders({ ':path': '/' }),
    metadata_context: { filter_metadata: { a: { fields: { b: { stringValue: 'c' } } } } },
    attributes: { 'envoy.filters.http.ext_proc': { fields: { 'xds.route_name': { stringValue: 'r' } } } },
    observability_mode: true,
  }));
  // protocol_config (11) is newer than the upstream snapshot: append it by hand (tag 11, length 2, {1: 1}).
  const withNewer = Buffer.concat([bytes, Buffer.from([0x5a, 0x02, 0x08, 0x01])]);
  assert.deepEqual({ kind: peekRequest(withNewer).kind, observabilityMode: peekRequest(withNewer).observabilityMode }, { kind: 'request_headers', observabilityMode: true });
  assert.equal(decodeRequest(withNewer).request, 'request_headers');
});

test('a truncated message is an error, not an empty request', () => {
  const bytes = Buffer.from(upstream.requestSerialize(requestHeaders(TYPICAL_HEADERS)));
  assert.throws(() => peekRequest(bytes.subarray(0, bytes.length - 5)));
});

test('findPath reads :path from upstream-encoded request_headers, raw_value or value, and gives up when unsure', () => {
  const long = `/orders/42?${'x'.repeat(300)}=1`; // a two-byte length
  for (const path of ['/orders/42?expand=lines', '/', long]) {
    const headers = TYPICAL_HEADERS.map(([k, v]): [string, string] => (k === ':path' ? [k, path] : [k, v]));
    assert.equal(findPath(upstream.requestSerialize(requestHeaders(headers))), path);
  }
  // Envoy before 1.27 sends `value`; with both, raw_value wins.
  const legacy = { request_headers: { headers: { headers: [{ key: ':method', value: 'GET' }, { key: ':path', value: '/old?a=1' }] } } };
  assert.equal(findPath(upstream.requestSerialize(legacy)), '/old?a=1');
  const both = { request_headers: { headers: { headers: [{ key: ':path', value: '/v', raw_value: Buffer.from('/raw') }] } } };
  assert.equal(findPath(upstream.requestSerialize(both)), '/raw');
  // No :path, or :path named twice: undefined, and the caller decodes the whole message.
  assert.equal(findPath(upstream.requestSerialize(requestHeaders([[':method', 'GET']]))), undefined);
  const twice = requestHeaders([[':path', '/a'], [':path', '/b?subscription-key=k']]);
  assert.equal(findPath(upstream.requestSerialize(twice)), undefined);
  // Cut short inside the value: undefined, never a read past the end.
  const bytes = upstream.requestSerialize(requestHeaders([[':path', '/orders/42?subscription-key=k']]));
  assert.equal(findPath(bytes.subarray(0, bytes.length - 3)), undefined);
});

// SDS and ext_authz: the same checks for the trimmed discovery, secret and auth protos.
const SDS = 'envoy.service.secret.v3.SecretDiscoveryService';
const AUTHZ = 'envoy.service.auth.v3.Authorization';
const oursSds = loadService('envoy/service/secret/v3/sds.proto', SDS) as Record<string, any>;
const upstreamSds = upstreamService('envoy/service/secret/v3/sds.proto', SDS);
const oursAuthz = loadService('envoy/service/auth/v3/external_auth.proto', AUTHZ) as Record<string, any>;
const upstreamAuthz = upstreamService('envoy/service/auth/v3/external_auth.proto', AUTHZ);
const ourSecret = messageType('envoy/extensions/transport_sockets/tls/v3/secret.proto', 'envoy.extensions.transport_sockets.tls.v3.Secret');

test('the SDS and ext_authz method paths and stream kinds are the ones Envoy calls', () => {
  for (const [ours, theirs] of [[oursSds, upstreamSds], [oursAuthz, upstreamAuthz]] as const) {
    assert.deepEqual(Object.keys(ours).sort(), Object.keys(theirs).sort());
    for (const name of Object.keys(theirs)) {
      assert.equal(ours[name].path, theirs[name]!.path);
      assert.equal(ours[name].requestStream, theirs[name]!.requestStream);
      assert.equal(ours[name].responseStream, theirs[name]!.responseStream);
    }
  }
  assert.equal(oursSds.StreamSecrets.path, '/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets');
  assert.equal(oursAuthz.Check.path, '/envoy.service.auth.v3.Authorization/Check');
});

test('a Secret with a generic secret encodes to the bytes of the upstream definition', () => {
  for (const secret of [
    { name: 'default', generic_secret: { secret: { inline_bytes: Buffer.from(`Bearer ${token.accessToken}`) } } },
    { name: 'reports', generic_secret: { secret: { inline_bytes: Buffer.alloc(0) } } },
    { name: 'x', generic_secret: { secret: { inline_string: 'Bearer s' } } },
  ]) {
    const mine = packAny(ourSecret, secret);
    assert.equal(mine.type_url, 'type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret');
    const theirs = upstreamSecretType();
    assert.deepEqual(mine.value, Buffer.from(theirs.encode(theirs.fromObject(secret)).finish()));
    const decoded = decodeSecret(mine);
    assert.equal(decoded.name, secret.name);
  }
});

test('DiscoveryResponse and DeltaDiscoveryResponse encode as upstream encodes them', () => {
  const any = packAny(ourSecret, { name: 'default', generic_secret: { secret: { inline_bytes: Buffer.from('Bearer t') } } });
  const sotw = { version_info: '7', resources: [any], type_url: any.type_url, nonce: '3.2' };
  assert.deepEqual(oursSds.StreamSecrets.responseSerialize(sotw), Buffer.from(upstreamSds.StreamSecrets!.responseSerialize(sotw)));
  assert.deepEqual(oursSds.FetchSecrets.responseSerialize(sotw), Buffer.from(upstreamSds.FetchSecrets!.responseSerialize(sotw)));
  const delta = { system_version_info: '7', resources: [{ name: 'default', version: '2', resource: any }], type_url: any.type_url, nonce: '1.1' };
  assert.deepEqual(oursSds.DeltaSecrets.responseSerialize(delta), Buffer.from(upstreamSds.DeltaSecrets!.responseSerialize(delta)));
  const decoded = upstreamSds.StreamSecrets!.responseDeserialize(oursSds.StreamSecrets.responseSerialize(sotw));
  assert.equal(decodeSecret(decoded.resources[0]).value, 'Bearer t');
});

test('Envoy-encoded discovery requests (node, locators, NACK detail) read correctly', () => {
  const request = {
    version_info: '6',
    node: { id: 'envoy-1', cluster: 'edge', user_agent_name: 'envoy' },
    resource_names: ['default', 'reports'],
    resource_locators: [{ name: 'default' }],
    type_url: 'type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret',
    response_nonce: '3.2',
    error_detail: { code: 3, message: 'bad', details: [{ type_url: 'type.googleapis.com/google.protobuf.Empty', value: Buffer.alloc(0) }] },
  };
  const bytes = Buffer.from(upstreamSds.StreamSecrets!.requestSerialize(request));
  assert.deepEqual(oursSds.StreamSecrets.requestDeserialize(bytes), {
    version_info: '6', resource_names: ['default', 'reports'], type_url: request.type_url, response_nonce: '3.2', error_detail: { code: 3, message: 'bad' },
  });
  const delta = {
    node: { id: 'envoy-1' },
    type_url: request.type_url,
    resource_names_subscribe: ['default'],
    resource_names_unsubscribe: ['old'],
    initial_resource_versions: { default: '4' },
    response_nonce: '1.1',
    error_detail: { code: 13, message: 'x' },
  };
  const { node: _node, ...rest } = delta;
  assert.deepEqual(oursSds.DeltaSecrets.requestDeserialize(Buffer.from(upstreamSds.DeltaSecrets!.requestSerialize(delta))), rest);
});

test('ext_authz: Envoy-encoded CheckRequests give the headers, path and context extensions', () => {
  const request = {
    attributes: {
      source: { address: { socket_address: { address: '10.0.0.1', port_value: 5000 } } },
      request: {
        time: { seconds: '1', nanos: 0 },
        http: { id: '1', method: 'GET', headers: { ':path': '/a?subscription-key=k', 'ocp-apim-subscription-key': 'k' }, path: '/a?subscription-key=k', host: 'h', protocol: 'HTTP/1.1' },
      },
      context_extensions: { 'x-oauth2-profile': 'reports' },
      metadata_context: { filter_metadata: { a: { fields: { b: { stringValue: 'c' } } } } },
    },
  };
  const decoded = oursAuthz.Check.requestDeserialize(Buffer.from(upstreamAuthz.Check!.requestSerialize(request)));
  assert.deepEqual(decoded, {
    attributes: {
      request: { http: { headers: request.attributes.request.http.headers, path: request.attributes.request.http.path } },
      context_extensions: { 'x-oauth2-profile': 'reports' },
    },
  });
  const raw = { attributes: { request: { http: { header_map: { headers: [{ key: 'a', raw_value: Buffer.from('b') }] } } } } };
  assert.deepEqual(oursAuthz.Check.requestDeserialize(Buffer.from(upstreamAuthz.Check!.requestSerialize(raw))), raw);
});

test('ext_authz: OK and denied CheckResponses encode as upstream encodes them', () => {
  const ok = {
    status: { code: 0 },
    ok_response: {
      headers: [{ header: { key: 'authorization', value: 'Bearer t' }, append: { value: false }, append_action: 'OVERWRITE_IF_EXISTS_OR_ADD' }],
      headers_to_remove: ['ocp-apim-subscription-key'],
      query_parameters_to_remove: ['subscription-key', 'Subscription-Key'],
    },
  };
  const denied = {
    status: { code: 7, message: 'no token' },
    denied_response: {
      status: { code: 'ServiceUnavailable' },
      headers: [{ header: { key: 'content-type', value: 'application/json' }, append: { value: false } }],
      body: '{"error":"OAUTH2_ERR_NO_TOKEN"}',
    },
  };
  for (const reply of [ok, denied]) {
    const mine = oursAuthz.Check.responseSerialize(reply);
    assert.deepEqual(mine, Buffer.from(upstreamAuthz.Check!.responseSerialize(reply)));
    const back = upstreamAuthz.Check!.responseDeserialize(mine);
    assert.equal(back.http_response, Object.keys(reply)[1]);
  }
});

test('ext_authz: the hot-path reader gets from an Envoy-encoded CheckRequest what the full decode gets', () => {
  const request = {
    attributes: {
      source: { address: { socket_address: { address: '10.0.0.1', port_value: 5000 } }, principal: 'spiffe://x' },
      destination: { service: 'orders', labels: { a: 'b' } },
      request: {
        time: { seconds: '1', nanos: 5 },
        http: {
          id: '7', method: 'POST', headers: { ':path': '/a?subscription-key=k', 'x-é': 'ü', ocp_apim_subscription_key: 'k' },
          path: '/a?subscription-key=k&é=1', host: 'h', size: '12', protocol: 'HTTP/2', body: 'ignored', raw_body: Buffer.from('x'),
        },
      },
      context_extensions: { 'x-oauth2-profile': 'reports', other: 'v' },
      metadata_context: { filter_metadata: { a: { fields: { b: { stringValue: 'c' } } } } },
      tls_session: { sni: 'api' },
    },
  };
  const bytes = Buffer.from(upstreamAuthz.Check!.requestSerialize(request));
  const peeked = peekCheck(bytes);
  assert.deepEqual(Object.fromEntries(peeked.extensions), request.attributes.context_extensions);
  assert.deepEqual([...peeked.headerNames].sort(), Object.keys(request.attributes.request.http.headers).sort());
  assert.equal(peeked.path, request.attributes.request.http.path);
  // header_map (Envoy's encode_raw_headers) instead of the map.
  const raw = { attributes: { request: { http: { header_map: { headers: [{ key: 'a_b', raw_value: Buffer.from('v') }, { key: 'c', value: 'w' }] }, path: '/' } } } };
  assert.deepEqual(peekCheck(Buffer.from(upstreamAuthz.Check!.requestSerialize(raw))).headerNames, ['a_b', 'c']);
  assert.throws(() => peekCheck(bytes.subarray(0, bytes.length - 3)));
});
