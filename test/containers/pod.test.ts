// deploy/kubernetes/ as a pod, with a real Docker engine (Kubernetes cannot run here): the
// Deployment's containers started as the kubelet starts them, from what the manifest says:
// images, args, env from the Secret, users (runAsUser/runAsGroup/fsGroup), read-only root
// filesystems, dropped capabilities, limits, the ConfigMaps and the example Secret mounted
// where the manifest mounts them, the socket emptyDir shared, one network namespace (a pause
// container), native sidecars started in order, each after the one before passed its startup
// probe. The probes run from here against the pod's IP (httpGet, tcpSocket, grpc) or inside
// the container (exec), with the manifest's thresholds (the period shortened to 1 s at most).
// So the test fails when the manifest and the images disagree. The one change: the ConfigMap's
// tokenUrls point at a mock-oauth2-server container instead of Entra ID, nothing else.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, chownSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { parse, parseAllDocuments } from 'yaml';
import { REPO } from '../../scripts/docker-build-check.ts';
import { buildImage, docker, dockerMissing, inspect, jwtClaims, tcpOpen, TEST_LABEL, waitFor } from './docker.ts';

const missing = dockerMissing() ?? (process.getuid?.() === 0 ? undefined : 'needs root (the Secret volume files are owned by root and the pod group)');
const DIR = join(REPO, 'deploy', 'kubernetes');
const kustomization = parse(readFileSync(join(DIR, 'kustomization.yaml'), 'utf8'));
const docs = (file: string): any[] => parseAllDocuments(readFileSync(join(DIR, file), 'utf8')).map((d) => d.toJS());
const deployment = docs('deployment.yaml')[0];
const secret = docs('secret.yaml')[0];
const configMaps: Record<string, Record<string, string>> = Object.fromEntries(
  (kustomization.configMapGenerator as Array<{ name: string; files: string[] }>).map((gen) => [gen.name, Object.fromEntries(gen.files.map((entry) => {
    const [key, file] = entry.includes('=') ? entry.split('=') as [string, string] : [entry, entry];
    return [key, readFileSync(join(DIR, file), 'utf8')];
  }))]),
);
/** The image a container runs after kustomize's `images:` mapping. */
const imageOf = (c: any): string => {
  const mapped = (kustomization.images ?? []).find((i: any) => i.name === c.image);
  return mapped ? `${mapped.newName}:${mapped.newTag}` : c.image;
};
const SIDECAR_IMAGE = imageOf(deployment.spec.template.spec.initContainers.find((c: any) => c.name === 'oauth2-extproc'));
const IDP_IMAGE = 'ghcr.io/navikt/mock-oauth2-server:2.1.10';

const made = { containers: [] as string[], volumes: [] as string[], dirs: [] as string[] };
let idpAddress: string;

before(async () => {
  if (missing !== undefined) return;
  // The image the manifest names (registry.example.com/…: a kustomize mapping) is the Dockerfile's.
  buildImage(SIDECAR_IMAGE);
  const idp = docker(['run', '-d', '--label', TEST_LABEL, '--name', `pod-idp-${process.pid}`, '-e', 'SERVER_PORT=8080', IDP_IMAGE]).stdout.trim();
  made.containers.push(idp);
  const ip = inspect(idp).NetworkSettings.IPAddress as string;
  await waitFor('the mock OAuth2 server', () => tcpOpen(ip, 8080).then((ok) => (ok ? true : undefined)), 60_000);
  idpAddress = `${ip}:8080`;
});

after(() => {
  for (const c of made.containers.reverse()) docker(['rm', '-f', '-v', c], { check: false });
  for (const v of made.volumes) docker(['volume', 'rm', '-f', v], { check: false });
  for (const d of made.dirs) rmSync(d, { recursive: true, force: true });
});

/** The sidecar ConfigMap with its token endpoints moved to the mock server; nothing else changes. */
function sidecarConfigForTest(text: string): string {
  const config = parse(text);
  const rewritten = text.replace(/tokenUrl: https:\/\/login\.microsoftonline\.com\/(\$\{TENANT_ID\})\/[^\s]+/g, `tokenUrl: http://${idpAddress}/$1/token`);
  const after = parse(rewritten);
  for (const profile of Object.values(after.profiles) as any[]) {
    assert.match(profile.tokenUrl, new RegExp(`^http://${idpAddress}/`), 'every tokenUrl is moved');
    delete profile.tokenUrl;
  }
  for (const profile of Object.values(config.profiles) as any[]) delete profile.tokenUrl;
  assert.deepEqual(after, config, 'only the tokenUrls differ from the ConfigMap');
  return rewritten;
}

const memory = (q: string): string => {
  const m = /^(\d+)(Mi|Gi)$/.exec(q);
  assert.ok(m, `memory limit ${q}`);
  return `${m[1]}${m[2] === 'Mi' ? 'm' : 'g'}`;
};

interface Pod {
  name: string;
  ip: string;
  /** Container name → docker container id. */
  ids: Map<string, string>;
  spec: any;
}

/** Starts the pod: pause, volumes, then the init (native sidecar) and app containers in order. */
async function startPod(name: string, spec: any): Promise<Pod> {
  const prefix = `pod-${process.pid}-${name}`;
  const sec = spec.securityContext;
  const pause = docker(['run', '-d', '--label', TEST_LABEL, '--name', `${prefix}-pause`, '--read-only', '--cap-drop', 'ALL', '--entrypoint', 'sleep', 'debian:trixie-slim', 'infinity']).stdout.trim();
  made.containers.push(pause);
  const pod: Pod = { name, ip: inspect(pause).NetworkSettings.IPAddress, ids: new Map(), spec };

  // Volumes as the kubelet makes them: an emptyDir is a fresh directory group-owned by fsGroup
  // (setgid, group-writable); ConfigMap files 0644; Secret items with their defaultMode,
  // group fsGroup; both mounted read-only.
  const volumes = new Map<string, { source: string; tmpfs?: boolean }>();
  for (const v of spec.volumes) {
    if (v.emptyDir) {
      const volume = `${prefix}-${v.name}`;
      const size = v.emptyDir.sizeLimit ? memory(v.emptyDir.sizeLimit) : '64m';
      docker(['volume', 'create', '--label', TEST_LABEL, '--driver', 'local', '--opt', 'type=tmpfs', '--opt', 'device=tmpfs', '--opt', `o=size=${size},mode=2777,gid=${sec.fsGroup}`, volume]);
      made.volumes.push(volume);
      volumes.set(v.name, { source: volume, tmpfs: true });
      continue;
    }
    const dir = mkdtempSync(join(tmpdir(), `${prefix}-${v.name}-`));
    made.dirs.push(dir);
    chmodSync(dir, 0o755);
    if (v.configMap) {
      const data = configMaps[v.configMap.name];
      assert.ok(data, `ConfigMap ${v.configMap.name} is generated by kustomization.yaml`);
      for (const [key, value] of Object.entries(data)) {
        const file = join(dir, key);
        writeFileSync(file, v.configMap.name === 'oauth2-extproc-config' ? sidecarConfigForTest(value) : value);
        chmodSync(file, v.configMap.defaultMode ?? 0o644);
      }
    } else if (v.secret) {
      assert.equal(v.secret.secretName, secret.metadata.name);
      const items = v.secret.items ?? Object.keys(secret.stringData).map((key: string) => ({ key, path: key }));
      for (const item of items) {
        assert.ok(item.key in secret.stringData, `Secret key ${item.key}`);
        const file = join(dir, item.path);
        mkdirSync(join(file, '..'), { recursive: true });
        writeFileSync(file, secret.stringData[item.key]);
        chownSync(file, 0, sec.fsGroup);
        chmodSync(file, item.mode ?? v.secret.defaultMode ?? 0o644);
      }
    } else {
      assert.fail(`volume ${v.name}: a kind this test does not reproduce`);
    }
    volumes.set(v.name, { source: dir });
  }

  const run = (c: any): void => {
    const s = c.securityContext ?? {};
    const user = s.runAsUser ?? sec.runAsUser;
    const group = s.runAsGroup ?? sec.runAsGroup ?? user;
    const args = ['run', '-d', '--label', TEST_LABEL, '--name', `${prefix}-${c.name}`, '--network', `container:${pause}`];
    if (user !== undefined) args.push('--user', `${user}:${group}`);
    if (sec.fsGroup !== undefined) args.push('--group-add', String(sec.fsGroup));
    if (s.readOnlyRootFilesystem) args.push('--read-only');
    for (const cap of s.capabilities?.drop ?? []) args.push('--cap-drop', cap);
    if (s.allowPrivilegeEscalation === false) args.push('--security-opt', 'no-new-privileges');
    if (c.resources?.limits?.memory) args.push('--memory', memory(c.resources.limits.memory));
    if (c.resources?.limits?.cpu) args.push('--cpus', String(c.resources.limits.cpu));
    for (const e of c.env ?? []) {
      const value = e.valueFrom?.secretKeyRef ? secret.stringData[e.valueFrom.secretKeyRef.key] : e.value;
      assert.ok(value !== undefined, `${c.name}: env ${e.name}`);
      args.push('-e', `${e.name}=${value}`);
    }
    for (const m of c.volumeMounts ?? []) {
      const v = volumes.get(m.name);
      assert.ok(v, `${c.name}: volume ${m.name}`);
      args.push('--mount', `type=${v.tmpfs ? 'volume' : 'bind'},source=${v.source},target=${m.mountPath}${m.readOnly || !v.tmpfs ? ',readonly' : ''}`);
    }
    if (c.command) args.push('--entrypoint', c.command[0]);
    args.push(imageOf(c), ...(c.command?.slice(1) ?? []), ...(c.args ?? []));
    const id = docker(args).stdout.trim();
    made.containers.push(id);
    pod.ids.set(c.name, id);
  };

  // Native sidecars (restartPolicy: Always) in order, each once its startup probe passed; then
  // the app containers, whose startup probes run after they all started.
  for (const c of spec.initContainers ?? []) {
    assert.equal(c.restartPolicy, 'Always', `${c.name}: only native sidecars are reproduced`);
    run(c);
    if (c.startupProbe) await untilStarted(pod, c);
  }
  for (const c of spec.containers) run(c);
  for (const c of spec.containers) if (c.startupProbe) await untilStarted(pod, c);
  return pod;
}

async function stopPod(pod: Pod): Promise<void> {
  for (const id of [...pod.ids.values()].reverse()) docker(['rm', '-f', '-v', id], { check: false });
}

const health = loadSync(join(REPO, 'node_modules', 'grpc-health-check', 'proto', 'health', 'v1', 'health.proto'));
const HealthClient = (grpc.loadPackageDefinition(health) as any).grpc.health.v1.Health as typeof grpc.Client;

/** One probe, as the kubelet runs it: true on success. */
async function probe(pod: Pod, c: any, p: any): Promise<boolean> {
  const timeoutMs = (p.timeoutSeconds ?? 1) * 1000;
  const port = (ref: string | number): number => (typeof ref === 'number' ? ref : c.ports.find((x: any) => x.name === ref).containerPort);
  if (p.httpGet) {
    try {
      const res = await fetch(`http://${pod.ip}:${port(p.httpGet.port)}${p.httpGet.path ?? '/'}`, { signal: AbortSignal.timeout(timeoutMs), redirect: 'manual' });
      await res.arrayBuffer();
      return res.status >= 200 && res.status < 400;
    } catch {
      return false;
    }
  }
  if (p.tcpSocket) return tcpOpen(pod.ip, port(p.tcpSocket.port), timeoutMs);
  if (p.exec) return docker(['exec', pod.ids.get(c.name)!, ...p.exec.command], { check: false, timeoutMs }).status === 0;
  if (p.grpc) {
    const client = new HealthClient(`${pod.ip}:${p.grpc.port}`, grpc.credentials.createInsecure());
    try {
      return await new Promise<boolean>((resolve) => {
        (client as any).check({ service: p.grpc.service ?? '' }, { deadline: Date.now() + timeoutMs }, (err: unknown, res: { status: string }) => resolve(!err && res.status === 'SERVING'));
      });
    } finally {
      client.close();
    }
  }
  throw new Error(`${c.name}: a probe of a kind the kubelet does not have`);
}

const period = (p: any): number => Math.min(p.periodSeconds ?? 10, 1) * 1000;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The startup probe until it passes; failureThreshold failures in a row: the kubelet would kill the container. */
async function untilStarted(pod: Pod, c: any): Promise<void> {
  const p = c.startupProbe;
  for (let failures = 0; ; failures++) {
    if (await probe(pod, c, p)) return;
    if (failures + 1 >= (p.failureThreshold ?? 3)) {
      throw new Error(`${pod.name}/${c.name}: startupProbe failed ${failures + 1} times in a row (the kubelet kills it):\n${docker(['logs', pod.ids.get(c.name)!], { check: false }).stdout.slice(-3000)}`);
    }
    await sleep(period(p));
  }
}

/** The readiness probe until it passes successThreshold times in a row (the container is Ready). */
async function untilReady(pod: Pod, c: any, timeoutMs = 60_000): Promise<void> {
  const p = c.readinessProbe;
  const deadline = Date.now() + timeoutMs;
  for (let streak = 0; streak < (p.successThreshold ?? 1);) {
    streak = (await probe(pod, c, p)) ? streak + 1 : 0;
    if (Date.now() > deadline) throw new Error(`${pod.name}/${c.name}: not Ready after ${timeoutMs / 1000} s`);
    if (streak < (p.successThreshold ?? 1)) await sleep(period(p));
  }
}

/** The readiness probe `times` times: how many failed. */
async function readinessFailures(pod: Pod, c: any, times: number): Promise<number> {
  let failed = 0;
  for (let i = 0; i < times; i++) {
    if (!(await probe(pod, c, c.readinessProbe))) failed++;
    await sleep(period(c.readinessProbe));
  }
  return failed;
}

async function callerRequest(pod: Pod): Promise<Response> {
  const port = pod.spec.initContainers.find((c: any) => c.name === 'envoy').ports.find((p: any) => p.name === 'http').containerPort;
  return fetch(`http://${pod.ip}:${port}/orders/42?subscription-key=query-key`, {
    headers: { 'Ocp-Apim-Subscription-Key': 'caller-key', Authorization: 'Bearer forged' },
    signal: AbortSignal.timeout(5000),
  });
}

test('the pod as the manifest describes it: every probe passes, and a request through Envoy gets the token and loses the key', { skip: missing }, async () => {
  const spec = structuredClone(deployment.spec.template.spec);
  const pod = await startPod('ok', spec);
  try {
    for (const c of [...spec.initContainers, ...spec.containers]) await untilReady(pod, c);
    for (const c of [...spec.initContainers, ...spec.containers]) {
      if (c.livenessProbe) assert.equal(await probe(pod, c, c.livenessProbe), true, `${c.name} livenessProbe`);
    }
    const res = await callerRequest(pod);
    assert.equal(res.status, 200);
    const echo = await res.json() as { headers: Record<string, string>; query: Record<string, string> };
    const claims = jwtClaims(echo.headers.authorization!.replace(/^Bearer /, ''));
    // A token from the IdP for the Secret's client, on the default profile's scope.
    assert.equal(claims.iss, `http://${idpAddress}/${secret.stringData['tenant-id']}`);
    assert.equal(claims.sub, secret.stringData['client-id']);
    assert.equal(claims.aud, parse(configMaps['oauth2-extproc-config']!['config.yaml']!).profiles.default.scope);
    assert.equal(echo.headers['ocp-apim-subscription-key'], undefined);
    assert.deepEqual(echo.query, {});
    // The sidecar logs no secret (the Secret's client secret, the caller's key).
    const logs = docker(['logs', pod.ids.get('oauth2-extproc')!]).stdout;
    assert.doesNotMatch(logs, new RegExp(`${secret.stringData['client-secret']}|caller-key|query-key`));
  } finally {
    await stopPod(pod);
  }
});

test('Envoy without the socket mount: every request fails, and the pod is not Ready', { skip: missing }, async () => {
  const spec = structuredClone(deployment.spec.template.spec);
  const envoy = spec.initContainers.find((c: any) => c.name === 'envoy');
  const socketDir = spec.initContainers.find((c: any) => c.name === 'oauth2-extproc').volumeMounts.find((m: any) => m.name === 'extproc-socket').mountPath;
  const before = envoy.volumeMounts.length;
  envoy.volumeMounts = envoy.volumeMounts.filter((m: any) => m.mountPath !== socketDir);
  assert.equal(envoy.volumeMounts.length, before - 1, 'Envoy mounted the socket volume');
  const pod = await startPod('nosocket', spec);
  try {
    await untilReady(pod, spec.initContainers.find((c: any) => c.name === 'oauth2-extproc')); // the sidecar itself is fine
    await untilReady(pod, spec.containers[0]);
    // Failing failureThreshold times in a row makes the kubelet mark it not Ready; it never passes.
    const times = envoy.readinessProbe.failureThreshold + 3;
    assert.equal(await readinessFailures(pod, envoy, times), times, 'Envoy stays not Ready: it cannot reach the sidecar');
    assert.equal((await callerRequest(pod)).status, 500);
  } finally {
    await stopPod(pod);
  }
});
