// deploy/kubernetes-workload-identity/, the AKS Workload Identity option, without a cluster: the
// overlay is built over the base the way kustomize does for the patch forms it uses (strategic
// merge by name, `$patch: delete`, a ConfigMap generator with behavior: replace), then every
// resource is checked against the Kubernetes schemas, no trace of the client secret is left, the
// pod opts in to the webhook, and the sidecar's config is valid with what the webhook injects.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parse, parseAllDocuments } from 'yaml';
import { Deployment } from 'kubernetes-models/apps/v1/Deployment';
import { ConfigMap } from 'kubernetes-models/v1/ConfigMap';
import { ServiceAccount } from 'kubernetes-models/v1/ServiceAccount';
import { parseConfig } from '../../src/config.ts';
import { REPO } from '../../scripts/docker-build-check.ts';

const BASE = join(REPO, 'deploy', 'kubernetes');
// Beside the base, not in it: kustomize refuses an overlay inside its base's folder.
const OVERLAY = join(REPO, 'deploy', 'kubernetes-workload-identity');
type Json = any;

/** The base as kustomize builds it, minus name hashes (its own test checks it in depth). */
function base(): Json[] {
  const k = parse(readFileSync(join(BASE, 'kustomization.yaml'), 'utf8'));
  const out: Json[] = [];
  for (const file of k.resources as string[]) for (const doc of parseAllDocuments(readFileSync(join(BASE, file), 'utf8'))) out.push(doc.toJS());
  for (const gen of k.configMapGenerator) out.push(configMap(BASE, gen));
  return out;
}

function configMap(dir: string, gen: { name: string; files: string[] }): Json {
  const data: Record<string, string> = {};
  for (const entry of gen.files) {
    const [key, file] = entry.includes('=') ? entry.split('=') : [entry, entry];
    data[key!] = readFileSync(join(dir, file!), 'utf8');
  }
  return { apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: gen.name }, data };
}

/** Keys kustomize merges list items by (Kubernetes' patchMergeKey for these fields). */
const MERGE_KEYS: Record<string, string> = { volumeMounts: 'mountPath', containers: 'name', initContainers: 'name', volumes: 'name', env: 'name' };

/** Strategic merge for what the overlay uses: maps merged, keyed lists merged, `$patch: delete`. */
function merge(target: Json, patch: Json, field = ''): Json {
  if (Array.isArray(patch)) {
    const key = MERGE_KEYS[field];
    if (key === undefined || !Array.isArray(target)) return patch;
    let items = [...target];
    for (const item of patch) {
      const at = items.findIndex((t) => t[key] === item[key]);
      if (item.$patch === 'delete') {
        assert.ok(at >= 0, `the patch deletes ${field} ${item[key]}, which the base does not have`);
        items = items.filter((_, i) => i !== at);
      } else if (at >= 0) {
        items[at] = merge(items[at], item, field);
      } else {
        items.push(item);
      }
    }
    return items;
  }
  if (typeof patch !== 'object' || patch === null) return patch;
  const out = { ...(target ?? {}) };
  for (const [k, v] of Object.entries(patch)) out[k] = merge(out[k], v, k);
  return out;
}

/** The overlay built over the base. */
function overlay(): Json[] {
  const k = parse(readFileSync(join(OVERLAY, 'kustomization.yaml'), 'utf8'));
  assert.deepEqual(k.resources, ['../kubernetes']);
  let resources = base();
  for (const { path } of k.patches as Array<{ path: string }>) {
    const patch = parse(readFileSync(join(OVERLAY, path), 'utf8'));
    const at = resources.findIndex((r) => r.kind === patch.kind && r.metadata.name === patch.metadata.name);
    assert.ok(at >= 0, `${path} patches ${patch.kind}/${patch.metadata.name}, which the base does not have`);
    resources = patch.$patch === 'delete' ? resources.filter((_, i) => i !== at) : resources.map((r, i) => (i === at ? merge(r, patch) : r));
  }
  for (const gen of k.configMapGenerator) {
    assert.equal(gen.behavior, 'replace');
    const at = resources.findIndex((r) => r.kind === 'ConfigMap' && r.metadata.name === gen.name);
    assert.ok(at >= 0, `the generator replaces ConfigMap ${gen.name}, which the base does not have`);
    resources[at] = configMap(OVERLAY, gen);
  }
  return resources;
}

const built = overlay();
const find = (kind: string, name: string): Json => built.find((r) => r.kind === kind && r.metadata.name === name);

test('the overlay builds over the base into valid resources, with no Secret', () => {
  assert.deepEqual(built.map((r) => `${r.kind}/${r.metadata.name}`).sort(), [
    'ConfigMap/envoy-config', 'ConfigMap/oauth2-extproc-config', 'Deployment/orders-api', 'NetworkPolicy/orders-api',
    'Service/orders-api', 'ServiceAccount/orders-api',
  ]);
  new Deployment(find('Deployment', 'orders-api')).validate();
  new ServiceAccount(find('ServiceAccount', 'orders-api')).validate();
  new ConfigMap(find('ConfigMap', 'oauth2-extproc-config')).validate();
});

test('nothing refers to the client secret any more', () => {
  const text = JSON.stringify(built);
  assert.ok(!text.includes('oauth2-extproc-credentials'), 'a reference to the Secret is left');
  assert.ok(!text.includes('/var/run/secrets/oauth2'), 'a mount or path of the Secret is left');
  assert.ok(!/clientSecret/.test(find('ConfigMap', 'oauth2-extproc-config').data['config.yaml']));
  // The check can fail: the base has both.
  assert.ok(JSON.stringify(base()).includes('oauth2-extproc-credentials'));
});

test('the pod opts in to the webhook and runs as the annotated ServiceAccount', () => {
  const deployment = find('Deployment', 'orders-api');
  assert.equal(deployment.spec.template.metadata.labels['azure.workload.identity/use'], 'true');
  const account = find('ServiceAccount', 'orders-api');
  assert.match(account.metadata.annotations['azure.workload.identity/client-id'], /^[0-9a-f-]{36}$/);
  assert.equal(deployment.spec.template.spec.serviceAccountName, account.metadata.name);
  // Everything else of the sidecar container is the base's.
  const sidecar = deployment.spec.template.spec.initContainers.find((c: Json) => c.name === 'oauth2-extproc');
  const baseSidecar = base().find((r) => r.kind === 'Deployment').spec.template.spec.initContainers.find((c: Json) => c.name === 'oauth2-extproc');
  assert.deepEqual({ ...sidecar, env: undefined, volumeMounts: undefined }, { ...baseSidecar, env: undefined, volumeMounts: undefined });
  assert.deepEqual(sidecar.volumeMounts.map((m: Json) => m.mountPath), ['/etc/oauth2-extproc', '/var/run/oauth2-extproc']);
});

test('the sidecar config is valid with the variables the webhook injects, and keeps the base\'s server', () => {
  const dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-wi-'));
  try {
    const tokenFile = join(dir, 'azure-identity-token');
    writeFileSync(tokenFile, 'eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln\n');
    const env = {
      AZURE_FEDERATED_TOKEN_FILE: tokenFile,
      AZURE_CLIENT_ID: '11111111-1111-1111-1111-111111111111',
      AZURE_TENANT_ID: '22222222-2222-2222-2222-222222222222',
      AZURE_AUTHORITY_HOST: 'https://login.microsoftonline.com/',
    };
    const text = find('ConfigMap', 'oauth2-extproc-config').data['config.yaml'];
    const config = parseConfig(text, { env });
    for (const profile of Object.values(config.profiles)) {
      assert.equal(profile.clientAuth, 'workload_identity');
      assert.match(profile.tokenUrl, /^https:\/\/login\.microsoftonline\.com\/22222222-2222-2222-2222-222222222222\/oauth2\//);
    }
    assert.deepEqual(Object.keys(config.profiles), ['default', 'reports'], 'the same profiles as the base, for envoy.yaml\'s routes');
    const baseConfig = parse(readFileSync(join(BASE, 'oauth2-extproc.yaml'), 'utf8'));
    assert.deepEqual(parse(text).server, baseConfig.server);
    // Without the webhook (no label), the sidecar refuses to start, saying why.
    assert.throws(() => parseConfig(text, { env: {} }), /tokenFile: required with clientAuth workload_identity \(or set AZURE_FEDERATED_TOKEN_FILE\)/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the same build as the real kustomize, where it is installed', (t) => {
  const kustomize = spawnSync('kustomize', ['build', OVERLAY], { encoding: 'utf8' });
  if (kustomize.error !== undefined) return t.skip('kustomize not on the PATH (go install sigs.k8s.io/kustomize/kustomize/v5@v5.4.3)');
  assert.equal(kustomize.status, 0, kustomize.stderr);
  const real = parseAllDocuments(kustomize.stdout).map((d) => d.toJS());
  const strip = (r: Json): Json => ({ ...r, metadata: { ...r.metadata, name: r.metadata.name.replace(/-[a-z0-9]{10}$/, '') } });
  const key = (r: Json): string => `${r.kind}/${strip(r).metadata.name}`;
  assert.deepEqual(real.map(key).sort(), built.map(key).sort());
  const deployment = real.find((r) => r.kind === 'Deployment');
  assert.deepEqual(deployment.spec.template.metadata.labels, find('Deployment', 'orders-api').spec.template.metadata.labels);
  assert.deepEqual(deployment.spec.template.spec.initContainers[0].volumeMounts, find('Deployment', 'orders-api').spec.template.spec.initContainers[0].volumeMounts);
  assert.deepEqual(deployment.spec.template.spec.volumes.map((v: Json) => v.name), find('Deployment', 'orders-api').spec.template.spec.volumes.map((v: Json) => v.name));
});
