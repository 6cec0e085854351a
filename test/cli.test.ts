// The command line as a user meets it: real process, real token endpoint.
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { readFileSync } from 'node:fs';
import { after, before, test } from 'node:test';
import { startOAuthServer, type OAuthServer } from './helpers/oauth-server.ts';
import { profileFor, runCli, writeConfig } from './helpers/sidecar.ts';

let idp: OAuthServer;
before(async () => {
  idp = await startOAuthServer();
});
after(async () => {
  await idp.close();
});

const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'));

test('--version and --help', async () => {
  assert.deepEqual(await runCli(['--version']), { code: 0, stdout: `${pkg.version}\n`, stderr: '' });
  const help = await runCli(['--help']);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /oauth2-extproc --config FILE/);
  assert.match(help.stdout, /check-config/);
  assert.match(help.stdout, /token --config FILE \[--profile NAME\]/);
});

test('usage errors exit 2 and say what is wrong', async () => {
  const none = await runCli([]);
  assert.equal(none.code, 2);
  assert.match(none.stderr, /^oauth2-extproc: --config FILE is required/);
  const unknown = await runCli(['serve', '--config', 'x']);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /unknown command "serve"/);
  const flag = await runCli(['--confg', 'x']);
  assert.equal(flag.code, 2);
  assert.match(flag.stderr, /^oauth2-extproc: unknown option --confg \(did you mean --config\?\)\n\nUsage:/);
});

test('a mistyped flag: one line naming the closest flag, not the argument parser\'s message', async () => {
  const cases: Array<[string[], string]> = [
    [['token', '--config', 'x', '--profil', 'reports'], 'unknown option --profil (did you mean --profile?)'],
    [['--verison'], 'unknown option --verison (did you mean --version?)'],
    [['--config=x', '--hepl'], 'unknown option --hepl (did you mean --help?)'],
    [['--listen', '0.0.0.0'], 'unknown option --listen'],
    [['-x'], 'unknown option -x'],
    [['--config'], '--config needs a value'],
    [['--help=yes'], '--help takes no value'],
  ];
  for (const [args, message] of cases) {
    const out = await runCli(args);
    assert.equal(out.code, 2, args.join(' '));
    assert.equal(out.stderr.split('\n')[0], `oauth2-extproc: ${message}`, args.join(' '));
    assert.doesNotMatch(out.stderr, /To specify a positional argument/);
  }
});

test('check-config prints a summary without secrets', async () => {
  const file = writeConfig({ profiles: { default: profileFor(idp) } });
  const { code, stdout, stderr } = await runCli(['check-config', '--config', file]);
  assert.equal(stderr, '');
  assert.equal(code, 0);
  assert.match(stdout, /: valid\n/);
  assert.match(stdout, /profile default:\n {2}tokenUrl: http:\/\/127\.0\.0\.1:\d+\/token/);
  assert.ok(!stdout.includes(idp.clients.post.clientSecret));
});

test('a config typo: one clear message naming the key, no stack trace, no listener started', async () => {
  const file = writeConfig(`profiles:\n  default:\n    tokenUrl: ${idp.tokenUrl}\n    clientId: a\n    clientSecret: b\n    scpoe: api://orders/.default\n`);
  const { code, stdout, stderr } = await runCli(['--config', file]);
  assert.equal(code, 2);
  assert.equal(stdout, '', 'no "listening" log line: it stopped before binding');
  assert.equal(stderr, `oauth2-extproc: ${file} is not valid (1 problem):\n  profiles.default.scpoe: unknown key (did you mean "scope"?)\n`);
});

test('token: describes the token and its claims, never prints it', async () => {
  const file = writeConfig({ profiles: { default: profileFor(idp), basic: profileFor(idp, { clientId: idp.clients.basic.clientId, clientSecret: idp.clients.basic.clientSecret, clientAuth: 'client_secret_basic', scope: undefined, resource: 'https://orders.test' }) } });
  const before = idp.tokenRequests.length;
  const { code, stdout, stderr } = await runCli(['token', '--config', file, '--profile', 'basic']);
  assert.equal(stderr, '');
  assert.equal(code, 0);
  assert.equal(idp.tokenRequests.length, before + 1);
  assert.match(stdout, /^status: ok\nprofile: basic\n/);
  assert.match(stdout, /token type: Bearer/);
  assert.match(stdout, /expires in: 300 s/);
  assert.match(stdout, /format: JWT/);
  assert.match(stdout, /"aud": "https:\/\/orders\.test"/);
  assert.match(stdout, /"client_id": "orders:basic"/);
  assert.doesNotMatch(stdout, /eyJ/, 'no part of the JWT is printed');
});

test('token: a refused secret shows the endpoint\'s error and exits 1', async () => {
  const file = writeConfig({ profiles: { default: profileFor(idp, { clientSecret: 'wrong-secret' }) } });
  const { code, stdout, stderr } = await runCli(['token', '--config', file]);
  assert.equal(code, 1);
  assert.equal(stdout, '');
  assert.match(stderr, /^status: failed\nprofile: default\n/);
  assert.match(stderr, /error: OAUTH2_ERR_TOKEN_STATUS/);
  assert.match(stderr, /http status: 401/);
  assert.match(stderr, /oauth error: invalid_client/);
  assert.ok(!stderr.includes('wrong-secret'));
});

test('token: an unknown profile is named with the configured ones', async () => {
  const file = writeConfig({ profiles: { default: profileFor(idp) } });
  const { code, stderr } = await runCli(['token', '--config', file, '--profile', 'other']);
  assert.equal(code, 2);
  assert.equal(stderr, 'oauth2-extproc: no profile "other" (configured: default)\n');
});

test('a port already in use is a clear error, exit 1', async () => {
  const busy = createServer();
  await new Promise<void>((r) => busy.listen(0, '127.0.0.1', r));
  const port = (busy.address() as { port: number }).port;
  try {
    const file = writeConfig({ server: { admin: `127.0.0.1:${port}` }, profiles: { default: profileFor(idp) } });
    const { code, stderr } = await runCli(['--config', file]);
    assert.equal(code, 1);
    assert.match(stderr, /^oauth2-extproc: cannot listen .*EADDRINUSE/);
  } finally {
    busy.close();
  }
});

test('a busy gRPC port is one clear message on stderr, exit 1, with workers too', async () => {
  const busy = createServer();
  await new Promise<void>((r) => busy.listen(0, '127.0.0.1', r));
  const port = (busy.address() as { port: number }).port;
  try {
    for (const workers of [1, 2]) {
      const file = writeConfig({ server: { grpc: `127.0.0.1:${port}`, workers }, profiles: { default: profileFor(idp) } });
      const { code, stdout, stderr } = await runCli(['--config', file]);
      const seen = `workers ${workers}; stderr:\n${stderr}\nstdout:\n${stdout}`;
      assert.equal(code, 1, seen);
      // One line, ours: no grpc-js log line before it, no worker complaining after it.
      assert.match(stderr, new RegExp(`^oauth2-extproc: cannot listen \\(server\\.grpc 127\\.0\\.0\\.1:${port}, server\\.admin 127\\.0\\.0\\.1:0\\): [^\\n]*EADDRINUSE[^\\n]*\\n$`), seen);
      assert.doesNotMatch(stdout, /"level":"(error|fatal)"/, seen);
    }
  } finally {
    busy.close();
  }
});
