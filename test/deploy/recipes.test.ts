// deploy/istio/ and deploy/envoy-gateway/ without a cluster: every custom resource valid against
// the upstream CRD schemas in ../shared/schemas (their openAPIV3Schema, as the API server checks
// it; CEL rules are not evaluated), core resources against kubernetes-models, Istio's mesh config
// against the fields of its MeshConfig message, and the cross-references a typo would break.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { Ajv, type ValidateFunction } from 'ajv';
import { parseAllDocuments } from 'yaml';
import { Deployment } from 'kubernetes-models/apps/v1/Deployment';
import { ConfigMap } from 'kubernetes-models/v1/ConfigMap';
import { Service } from 'kubernetes-models/v1/Service';
import { REPO } from '../../scripts/docker-build-check.ts';
import { PROFILE_EXTENSION } from '../../src/protocols/ext-authz.ts';
import { runCli } from '../helpers/sidecar.ts';

const SCHEMAS = join(REPO, '..', 'shared', 'schemas');
const ajv = new Ajv({ allErrors: true, strict: false, validateFormats: false });
const validators = new Map<string, ValidateFunction>();
for (const file of readdirSync(SCHEMAS).filter((f) => f.endsWith('.yaml'))) {
  for (const doc of parseAllDocuments(readFileSync(join(SCHEMAS, file), 'utf8'))) {
    const crd = doc.toJS();
    if (crd?.kind !== 'CustomResourceDefinition') continue;
    for (const version of crd.spec.versions) {
      validators.set(`${crd.spec.group}/${version.name}/${crd.spec.names.kind}`, ajv.compile(version.schema.openAPIV3Schema));
    }
  }
}
const CORE: Record<string, new (data: any) => { validate(): void }> = { 'apps/v1/Deployment': Deployment, 'v1/ConfigMap': ConfigMap, 'v1/Service': Service };

function load(folder: string): any[] {
  const dir = join(REPO, 'deploy', folder);
  return readdirSync(dir).filter((f) => f.endsWith('.yaml')).sort().flatMap((file) => parseAllDocuments(readFileSync(join(dir, file), 'utf8')).map((d) => ({ ...d.toJS(), file })));
}
const istio = load('istio');
const gateway = load('envoy-gateway');
const find = (docs: any[], kind: string, name?: string): any => {
  const found = docs.find((d) => d.kind === kind && (name === undefined || d.metadata?.name === name));
  assert.ok(found, `${kind} ${name ?? ''}`);
  return found;
};

test('the Istio and Envoy Gateway recipes are there', () => {
  assert.deepEqual([...new Set(istio.map((d) => d.file))], ['mesh-config.yaml', 'oauth2-extproc.yaml', 'sidecar.yaml', 'waypoint.yaml']);
  assert.deepEqual([...new Set(gateway.map((d) => d.file))], ['backend.yaml', 'extension-policy.yaml', 'httproutes.yaml', 'security-policy.yaml']);
});

for (const doc of [...istio, ...gateway]) {
  const { kind, apiVersion, file } = doc;
  if (kind === 'IstioOperator') continue;
  test(`${file}: ${kind} ${doc.metadata.name} is valid against its schema`, () => {
    const core = CORE[`${apiVersion}/${kind}`];
    if (core !== undefined) {
      const { file: _file, ...resource } = doc;
      new core(resource).validate();
      return;
    }
    const validate = validators.get(`${apiVersion}/${kind}`);
    assert.ok(validate, `no CRD for ${apiVersion} ${kind}`);
    const { file: _file, ...resource } = doc;
    assert.ok(validate(resource), JSON.stringify(validate.errors, null, 1));
  });
}

test('the schema check can fail: a value outside a CRD\'s enum is refused', () => {
  const { file: _file, ...policy } = structuredClone(find(gateway, 'SecurityPolicy'));
  // (An unknown field would pass: the API server prunes it, as these schemas allow.)
  policy.spec.extAuth.statusOnError = 299;
  const validate = validators.get('gateway.envoyproxy.io/v1alpha1/SecurityPolicy')!;
  assert.equal(validate(policy), false);
  assert.equal(validate.errors?.[0]?.keyword, 'enum');
});

// The MeshConfig message (istio/api mesh/v1alpha1/config.proto, EnvoyExternalAuthorizationGrpcProvider).
const GRPC_PROVIDER_FIELDS = ['service', 'port', 'timeout', 'failOpen', 'statusOnError', 'includeRequestBodyInCheck'];

test('Istio: the mesh provider names the sidecar\'s Service and gRPC port, fails closed; both policies use it', () => {
  const [provider] = find(istio, 'IstioOperator').spec.meshConfig.extensionProviders;
  for (const key of Object.keys(provider.envoyExtAuthzGrpc)) assert.ok(GRPC_PROVIDER_FIELDS.includes(key), key);
  const service = find(istio, 'Service', 'oauth2-extproc');
  assert.equal(provider.envoyExtAuthzGrpc.service, `${service.metadata.name}.oauth2-extproc.svc.cluster.local`);
  const grpc = service.spec.ports.find((p: any) => p.name === 'grpc');
  assert.equal(provider.envoyExtAuthzGrpc.port, grpc.port);
  assert.equal(grpc.appProtocol, 'grpc');
  assert.equal(provider.envoyExtAuthzGrpc.failOpen, false);
  const policies = istio.filter((d) => d.kind === 'AuthorizationPolicy' && d.spec.action === 'CUSTOM');
  assert.equal(policies.length, 2);
  for (const policy of policies) assert.equal(policy.spec.provider.name, provider.name);
  // Sidecar mode selects workloads; ambient targets a Service (its waypoint runs the check).
  assert.deepEqual(policies.find((p) => p.file === 'sidecar.yaml').spec.selector, { matchLabels: { app: 'orders' } });
  assert.equal(policies.find((p) => p.file === 'waypoint.yaml').spec.targetRefs[0].kind, 'Service');
});

test('Envoy Gateway: every policy reaches the Backend on the sidecar\'s port over h2c, fails closed, and targets a route', () => {
  const backend = find(gateway, 'Backend', 'oauth2-extproc');
  assert.deepEqual(backend.spec.appProtocols, ['gateway.envoyproxy.io/h2c']);
  const service = find(istio, 'Service', 'oauth2-extproc');
  assert.deepEqual(backend.spec.endpoints[0].fqdn, { hostname: 'oauth2-extproc.oauth2-extproc.svc.cluster.local', port: service.spec.ports[0].port });
  const routes = new Set(gateway.filter((d) => d.kind === 'HTTPRoute').map((d) => d.metadata.name));
  const refs = (d: any): any[] => d.kind === 'SecurityPolicy' ? d.spec.extAuth.grpc.backendRefs : d.spec.extProc.flatMap((p: any) => p.backendRefs);
  for (const policy of gateway.filter((d) => d.kind === 'SecurityPolicy' || d.kind === 'EnvoyExtensionPolicy')) {
    for (const ref of refs(policy)) assert.deepEqual(ref, { group: 'gateway.envoyproxy.io', kind: 'Backend', name: backend.metadata.name, port: backend.spec.endpoints[0].fqdn.port });
    for (const target of policy.spec.targetRefs) assert.ok(routes.has(target.name), target.name);
    const failOpen = policy.kind === 'SecurityPolicy' ? policy.spec.extAuth.failOpen : policy.spec.extProc[0].failOpen;
    assert.equal(failOpen, false, policy.metadata.name);
  }
  // Without processingMode.request Envoy Gateway sends the processor nothing.
  assert.deepEqual(find(gateway, 'EnvoyExtensionPolicy').spec.extProc[0].processingMode, { request: {} });
  // The reports route names its profile the way the sidecar reads it.
  assert.deepEqual(find(gateway, 'SecurityPolicy', 'oauth2-extproc-reports').spec.extAuth.contextExtensions, [{ name: PROFILE_EXTENSION, type: 'Value', value: 'reports' }]);
  assert.equal(find(gateway, 'SecurityPolicy', 'oauth2-extproc-orders').spec.extAuth.contextExtensions, undefined);
});

test('the shared service\'s config passes check-config and listens on the Service\'s ports', async () => {
  const text: string = find(istio, 'ConfigMap', 'oauth2-extproc-config').data['config.yaml'];
  const dir = mkdtempSync(join(tmpdir(), 'recipe-check-'));
  let local = text;
  for (const file of new Set([...text.matchAll(/\$\{file:([^}]+)\}/g)].map((m) => m[1]!))) {
    mkdirSync(dirname(join(dir, file)), { recursive: true });
    writeFileSync(join(dir, file), 'value');
    local = local.replaceAll(`\${file:${file}}`, `\${file:${join(dir, file)}}`);
  }
  writeFileSync(join(dir, 'config.yaml'), local);
  const out = await runCli(['check-config', '--config', join(dir, 'config.yaml')], { TENANT_ID: 'tenant' });
  rmSync(dir, { recursive: true, force: true });
  assert.equal(out.code, 0, out.stderr);
  assert.match(text, /grpc: 0\.0\.0\.0:9001/);
  const container = find(istio, 'Deployment', 'oauth2-extproc').spec.template.spec.containers[0];
  assert.deepEqual(container.ports.map((p: any) => p.containerPort), [9001, 9002]);
});
