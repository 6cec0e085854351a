// deploy/kubernetes/ without a cluster: every resource valid against the Kubernetes schemas
// (kubernetes-models), the kustomization's generated ConfigMaps built from its files, and the
// cross-references a typo would break: mounted ConfigMaps and Secrets exist with the keys the
// configs read, ports and probe paths match the sidecar's config, the socket is shared, the
// Envoy config is envoy/envoy-uds.yaml byte for byte, and every container is locked down.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { parse, parseAllDocuments } from 'yaml';
import { Deployment } from 'kubernetes-models/apps/v1/Deployment';
import { NetworkPolicy } from 'kubernetes-models/networking.k8s.io/v1/NetworkPolicy';
import { ConfigMap } from 'kubernetes-models/v1/ConfigMap';
import { Secret } from 'kubernetes-models/v1/Secret';
import { Service } from 'kubernetes-models/v1/Service';
import { ServiceAccount } from 'kubernetes-models/v1/ServiceAccount';
import { REPO } from '../../scripts/docker-build-check.ts';
import { ENVOY_DIR } from '../helpers/envoy.ts';
import { runCli } from '../helpers/sidecar.ts';

const DIR = join(REPO, 'deploy', 'kubernetes');
const MODELS: Record<string, new (data: any) => { validate(): void }> = {
  'apps/v1/Deployment': Deployment,
  'networking.k8s.io/v1/NetworkPolicy': NetworkPolicy,
  'v1/ConfigMap': ConfigMap,
  'v1/Secret': Secret,
  'v1/Service': Service,
  'v1/ServiceAccount': ServiceAccount,
};

const kustomization = parse(readFileSync(join(DIR, 'kustomization.yaml'), 'utf8'));

/** What `kubectl kustomize` builds, minus the name hashes: resources, generated ConfigMaps, images. */
function build(): any[] {
  const resources: any[] = [];
  for (const file of kustomization.resources as string[]) {
    for (const doc of parseAllDocuments(readFileSync(join(DIR, file), 'utf8'))) {
      if (doc.errors.length > 0) throw new Error(`${file}: ${doc.errors[0]!.message}`);
      resources.push(doc.toJS());
    }
  }
  for (const gen of kustomization.configMapGenerator as Array<{ name: string; files: string[] }>) {
    const data: Record<string, string> = {};
    for (const entry of gen.files) {
      const [key, file] = entry.includes('=') ? entry.split('=') as [string, string] : [entry, entry];
      data[key] = readFileSync(join(DIR, file), 'utf8');
    }
    resources.push({ apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: gen.name }, data });
  }
  for (const r of resources) {
    for (const c of [...(r.spec?.template?.spec?.initContainers ?? []), ...(r.spec?.template?.spec?.containers ?? [])]) {
      const image = (kustomization.images ?? []).find((i: any) => i.name === c.image);
      if (image) c.image = `${image.newName}:${image.newTag}`;
    }
  }
  return resources;
}

const resources = build();
const find = (kind: string, name?: string): any => {
  const found = resources.filter((r) => r.kind === kind && (name === undefined || r.metadata.name === name));
  assert.equal(found.length, 1, `one ${kind}${name ? ` ${name}` : ''}`);
  return found[0];
};
const deployment = find('Deployment');
const pod = deployment.spec.template.spec;
const sidecar = pod.initContainers.find((c: any) => c.name === 'oauth2-extproc');
const envoy = pod.initContainers.find((c: any) => c.name === 'envoy');
const app = pod.containers[0];
const allContainers = [...pod.initContainers, ...pod.containers];

/** The file a container sees at `path`, from the ConfigMap or Secret volume mounted above it. */
function mounted(container: any, path: string): { volume: any; key: string } {
  const mount = container.volumeMounts.find((m: any) => path.startsWith(`${m.mountPath}/`));
  assert.ok(mount, `${container.name} mounts something at ${dirname(path)}`);
  const volume = pod.volumes.find((v: any) => v.name === mount.name);
  return { volume, key: path.slice(mount.mountPath.length + 1) };
}

function configMapFile(container: any, path: string): string {
  const { volume, key } = mounted(container, path);
  assert.ok(volume.configMap, `${path} comes from a ConfigMap`);
  const data = find('ConfigMap', volume.configMap.name).data;
  assert.ok(key in data, `ConfigMap ${volume.configMap.name} has ${key}`);
  return data[key];
}

const sidecarConfigText = configMapFile(sidecar, sidecar.args[sidecar.args.indexOf('--config') + 1]);
const sidecarConfig = parse(sidecarConfigText);
const envoyConfigText = configMapFile(envoy, envoy.args[envoy.args.indexOf('--config-path') + 1]);
const envoyConfig = parse(envoyConfigText);
const cluster = (name: string): any => envoyConfig.static_resources.clusters.find((c: any) => c.name === name).load_assignment.endpoints[0].lb_endpoints[0].endpoint.address;
const port = (container: any, nameOrNumber: string | number): number => typeof nameOrNumber === 'number' ? nameOrNumber : container.ports.find((p: any) => p.name === nameOrNumber).containerPort;

test('every resource is valid against the Kubernetes schemas', () => {
  assert.deepEqual(resources.map((r) => `${r.kind}/${r.metadata.name}`).sort(), [
    'ConfigMap/envoy-config', 'ConfigMap/oauth2-extproc-config', 'Deployment/orders-api', 'NetworkPolicy/orders-api',
    'Secret/oauth2-extproc-credentials', 'Service/orders-api', 'ServiceAccount/orders-api',
  ]);
  for (const r of resources) {
    const Model = MODELS[`${r.apiVersion}/${r.kind}`];
    assert.ok(Model, `a model for ${r.apiVersion} ${r.kind}`);
    new Model(r).validate();
  }
});

test('the schema check can fail', () => {
  const broken = structuredClone(deployment);
  broken.spec.replicas = 'two';
  broken.spec.template.spec.initContainers[0].resources.limits.memory = '256 Mi';
  assert.throws(() => new Deployment(broken).validate(), /replicas must be integer.*memory must match format "quantity"/s);
});

test('Envoy and oauth2-extproc are native sidecars, the token source first', () => {
  assert.deepEqual(pod.initContainers.map((c: any) => [c.name, c.restartPolicy]), [['oauth2-extproc', 'Always'], ['envoy', 'Always']]);
  assert.match(envoy.image, /^envoyproxy\/envoy:distroless-v\d+\.\d+\.\d+$/);
  assert.equal(sidecar.image, `${kustomization.images[0].newName}:${kustomization.images[0].newTag}`);
});

test('the Envoy ConfigMap is envoy/envoy-uds.yaml, byte for byte', () => {
  assert.equal(envoyConfigText, readFileSync(join(ENVOY_DIR, 'envoy-uds.yaml'), 'utf8'));
});

test("Envoy reaches the sidecar through the socket the sidecar binds, in a volume both mount", () => {
  const socket = sidecarConfig.server.grpc.replace(/^unix:/, '');
  assert.equal(cluster('oauth2_extproc').pipe.path, socket);
  const dir = dirname(socket);
  const volumeOf = (c: any) => c.volumeMounts.find((m: any) => m.mountPath === dir)?.name;
  assert.ok(volumeOf(sidecar));
  assert.equal(volumeOf(envoy), volumeOf(sidecar));
  assert.ok(pod.volumes.find((v: any) => v.name === volumeOf(sidecar)).emptyDir);
});

test('ports line up: Service → Envoy listener → application; probes on the sidecar admin paths', () => {
  const listenerPort = envoyConfig.static_resources.listeners[0].address.socket_address.port_value;
  const service = find('Service');
  assert.deepEqual(service.spec.selector, deployment.spec.selector.matchLabels);
  assert.equal(port(envoy, service.spec.ports[0].targetPort), listenerPort);
  assert.deepEqual(cluster('backend').socket_address, { address: '127.0.0.1', port_value: port(app, 'app') });
  assert.equal(app.env.find((e: any) => e.name === 'HTTP_PORT').value, String(port(app, 'app')));

  const adminPort = Number(sidecarConfig.server.admin.split(':').at(-1));
  assert.match(sidecarConfig.server.admin, /^0\.0\.0\.0:/, 'the kubelet probes the pod IP');
  for (const [probe, path] of [['startupProbe', '/healthz'], ['readinessProbe', '/readyz'], ['livenessProbe', '/healthz']] as const) {
    assert.equal(sidecar[probe].httpGet.path, path, probe);
    assert.equal(port(sidecar, sidecar[probe].httpGet.port), adminPort, probe);
  }
  for (const probe of ['startupProbe', 'readinessProbe', 'livenessProbe']) {
    const action = envoy[probe].httpGet ?? envoy[probe].tcpSocket;
    assert.equal(port(envoy, action.port), listenerPort, probe);
  }
  // Envoy's readiness goes through the ext_proc filter to a route Envoy answers itself: it fails
  // when Envoy cannot reach the sidecar (test/containers/pod.test.ts removes the socket mount).
  assert.equal(envoy.readinessProbe.httpGet.path, '/oauth2-extproc/ready');
  const route = envoyConfig.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes
    .find((r: any) => r.match.path === envoy.readinessProbe.httpGet.path);
  assert.deepEqual(route, { match: { path: '/oauth2-extproc/ready' }, direct_response: { status: 200, body: { inline_string: 'ready\n' } } });
  const policyPorts = find('NetworkPolicy').spec.ingress.flatMap((i: any) => i.ports.map((p: any) => p.port)).sort();
  assert.deepEqual(policyPorts, [listenerPort, adminPort].sort());
  const annotations = deployment.spec.template.metadata.annotations;
  assert.equal(annotations['prometheus.io/port'], String(adminPort));
});

test("the sidecar's secrets: every file and variable its config reads comes from the Secret", () => {
  const secret = find('Secret');
  const files = [...sidecarConfigText.matchAll(/\$\{file:([^}]+)\}/g)].map((m) => m[1]!);
  assert.ok(files.length > 0);
  for (const file of new Set(files)) {
    const { volume, key } = mounted(sidecar, file);
    assert.equal(volume.secret?.secretName, secret.metadata.name, file);
    const item = volume.secret.items?.find((i: any) => i.path === key);
    assert.ok(key in secret.stringData && (volume.secret.items === undefined || item?.key === key), `Secret key ${key}`);
  }
  const vars = [...sidecarConfigText.matchAll(/\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g)].map((m) => m[1]!);
  for (const name of new Set(vars)) {
    const env = sidecar.env.find((e: any) => e.name === name);
    assert.ok(env, `env ${name}`);
    assert.equal(env.valueFrom.secretKeyRef.name, secret.metadata.name);
    assert.ok(env.valueFrom.secretKeyRef.key in secret.stringData);
  }
  // No subPath: kubelet refreshes a whole-volume mount when the Secret rotates.
  for (const c of allContainers) for (const m of c.volumeMounts ?? []) assert.equal(m.subPath, undefined, `${c.name} ${m.mountPath}`);
});

test("the sidecar's config passes its own check-config (Secret files and env as the pod has them)", async () => {
  const secret = find('Secret');
  const dir = mkdtempSync(join(tmpdir(), 'k8s-check-'));
  let text = sidecarConfigText;
  for (const file of new Set([...sidecarConfigText.matchAll(/\$\{file:([^}]+)\}/g)].map((m) => m[1]!))) {
    const local = join(dir, file);
    mkdirSync(dirname(local), { recursive: true });
    writeFileSync(local, secret.stringData[mounted(sidecar, file).key]);
    text = text.replaceAll(`\${file:${file}}`, `\${file:${local}}`);
  }
  writeFileSync(join(dir, 'config.yaml'), text);
  const env = Object.fromEntries(sidecar.env.map((e: any) => [e.name, secret.stringData[e.valueFrom.secretKeyRef.key]]));
  const out = await runCli(['check-config', '--config', join(dir, 'config.yaml')], env);
  rmSync(dir, { recursive: true, force: true });
  assert.equal(out.code, 0, out.stderr);
  // Each profile Envoy's routes name exists.
  const named = [...envoyConfigText.matchAll(/key: x-oauth2-profile, value: ([\w.-]+)/g)].map((m) => m[1]!);
  for (const profile of ['default', ...named]) assert.ok(profile in sidecarConfig.profiles, profile);
});

test('every container: non-root, read-only root filesystem, no capabilities, no escalation, requests and limits', () => {
  assert.equal(pod.securityContext.runAsNonRoot, true);
  assert.notEqual(pod.securityContext.runAsUser, 0);
  assert.equal(pod.automountServiceAccountToken, false);
  for (const c of allContainers) {
    assert.equal(c.securityContext.readOnlyRootFilesystem, true, c.name);
    assert.equal(c.securityContext.allowPrivilegeEscalation, false, c.name);
    assert.deepEqual(c.securityContext.capabilities.drop, ['ALL'], c.name);
    assert.equal(c.securityContext.runAsUser ?? pod.securityContext.runAsUser, pod.securityContext.runAsUser, c.name);
    for (const kind of ['requests', 'limits']) {
      assert.ok(c.resources[kind].cpu && c.resources[kind].memory, `${c.name} ${kind}`);
    }
    assert.ok(c.readinessProbe, `${c.name} readiness probe`);
  }
});

test('every volume a container mounts exists, and every ConfigMap, Secret and ServiceAccount named exists', () => {
  const volumes = new Set(pod.volumes.map((v: any) => v.name));
  for (const c of allContainers) for (const m of c.volumeMounts ?? []) assert.ok(volumes.has(m.name), `${c.name}: ${m.name}`);
  for (const v of pod.volumes) {
    if (v.configMap) find('ConfigMap', v.configMap.name);
    if (v.secret) find('Secret', v.secret.secretName);
  }
  find('ServiceAccount', pod.serviceAccountName);
});

// kubectl is not part of the CI machine; where it is installed, check its build agrees.
const kubectl = spawnSync('kubectl', ['version', '--client'], { encoding: 'utf8' }).status === 0;
test('kubectl kustomize builds the same resources (hashed ConfigMap names)', { skip: kubectl ? false : 'kubectl not installed' }, () => {
  const out = spawnSync('kubectl', ['kustomize', DIR], { encoding: 'utf8' });
  assert.equal(out.status, 0, out.stderr);
  const built = parseAllDocuments(out.stdout).map((d) => d.toJS());
  const names = built.map((r) => `${r.kind}/${r.metadata.name.replace(/-[a-z0-9]{10}$/, '')}`).sort();
  assert.deepEqual(names, resources.map((r) => `${r.kind}/${r.metadata.name}`).sort());
  const builtPod = built.find((r) => r.kind === 'Deployment').spec.template.spec;
  for (const v of builtPod.volumes) if (v.configMap) assert.ok(built.some((r) => r.kind === 'ConfigMap' && r.metadata.name === v.configMap.name), v.configMap.name);
  for (const r of built) new MODELS[`${r.apiVersion}/${r.kind}`]!(r).validate();
});
