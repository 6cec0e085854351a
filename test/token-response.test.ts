// A token endpoint that echoes our whole request back (every header, the whole form, in several
// serialisations) in its error body: no encoding of the secret may reach an error, a log line at
// trace level, or the `token` command's output. The echo server is a real node:http server.
import assert from 'node:assert/strict';
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { inspect } from 'node:util';
import { Agent } from 'undici';
import type { ProfileConfig } from '../src/config.ts';
import { TokenEndpointError, TokenFetchError, TokenResponseError } from '../src/errors.ts';
import { mask } from '../src/token-response.ts';
import { TokenSource } from '../src/token-source.ts';
import { fixed, testProfile } from './helpers/config.ts';
import { FakeClock } from './helpers/fake-clock.ts';
import { runCli, startSidecar, writeConfig } from './helpers/sidecar.ts';

// Characters that every encoding treats differently: '+', space, '%', '&', '"', '\', '/', '=',
// ':' and non-ASCII (2-, 3- and 4-byte UTF-8).
const SECRET = 'S3cr+t 50%&"q\\/=:é€😀-tail';
const CLIENT_ID = 'echo:client';

/** The client authentication methods that send a client secret. */
type ClientAuth = 'client_secret_post' | 'client_secret_basic';
const STATUSES = [400, 401, 500, 200] as const;
const FORMATS = ['json', 'text'] as const;
type Format = (typeof FORMATS)[number];

/** What an echoing endpoint can repeat of a request: each a way some server really serialises it. */
const ECHOES: Record<string, (r: Echoed) => string> = {
  rawHeaders: (r) => r.rawHeaders,
  rawForm: (r) => r.body,
  formWithPercent20: (r) => [...new URLSearchParams(r.body)].map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`).join('&'),
  lowerCaseHex: (r) => r.body.replace(/%[0-9A-F]{2}/g, (m) => m.toLowerCase()),
  json: (r) => JSON.stringify({ authorization: r.authorization, form: Object.fromEntries(new URLSearchParams(r.body)) }),
  // Python's json.dumps (ensure_ascii) and PHP's json_encode escape non-ASCII and '/'.
  asciiJson: (r) => asciiJson({ authorization: r.authorization, form: Object.fromEntries(new URLSearchParams(r.body)) }),
  decodedBasic: (r) => (r.authorization === undefined ? 'no basic' : Buffer.from(r.authorization.slice(6), 'base64').toString('utf8')),
  base64url: (r) => Buffer.from(r.authorization?.slice(6) ?? '', 'base64').toString('base64url') + ' ' + Buffer.from(secretOf(r), 'utf8').toString('base64url'),
  base64: (r) => Buffer.from(secretOf(r), 'utf8').toString('base64'),
  percentEncoded: (r) => encodeURIComponent(secretOf(r)),
};

interface Echoed {
  rawHeaders: string;
  body: string;
  authorization: string | undefined;
}

interface Mode {
  status: number;
  format: Format;
  echo: string;
}

const ALL_MODES: Mode[] = STATUSES.flatMap((status) => FORMATS.flatMap((format) => Object.keys(ECHOES).map((echo) => ({ status, format, echo }))));

function asciiJson(value: unknown): string {
  return JSON.stringify(value).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`).replace(/\//g, '\\/');
}

/** The secret as the endpoint received it, from whichever place the client put it. */
function secretOf(r: Echoed): string {
  const posted = new URLSearchParams(r.body).get('client_secret');
  if (posted !== null) return posted;
  const pair = Buffer.from(r.authorization?.slice(6) ?? '', 'base64').toString('utf8');
  return decodeURIComponent(pair.slice(pair.indexOf(':') + 1).replace(/\+/g, ' '));
}

function formEncode(value: string): string {
  return new URLSearchParams([['', value]]).toString().slice(1);
}

/** Every encoding of the secret that must never appear, written out here independently of src/. */
function forbidden(): string[] {
  const pair = `${formEncode(CLIENT_ID)}:${formEncode(SECRET)}`;
  const b64 = (s: string) => Buffer.from(s, 'utf8').toString('base64');
  const b64url = (s: string) => Buffer.from(s, 'utf8').toString('base64url');
  const list = [
    SECRET,
    formEncode(SECRET),
    formEncode(SECRET).replace(/\+/g, '%20'),
    encodeURIComponent(SECRET),
    encodeURIComponent(SECRET).replace(/%[0-9A-F]{2}/g, (m) => m.toLowerCase()),
    JSON.stringify(SECRET).slice(1, -1),
    asciiJson(SECRET).slice(1, -1),
    b64(SECRET), b64url(SECRET), b64(pair), b64url(pair), `Basic ${b64(pair)}`,
    // Distinctive pieces: a leak of part of the secret counts too.
    'S3cr+t', 'S3cr%2Bt', '50%&', '-tail', b64(pair).slice(8, 24),
  ];
  return [...new Set(list)];
}

function assertClean(text: string, where: string): void {
  for (const needle of forbidden()) assert.ok(!text.includes(needle), `${where} contains ${JSON.stringify(needle)}:\n${text}`);
}

interface EchoServer {
  url: string;
  /** Answers per client auth method, in order; when a queue is empty, ALL_MODES again. */
  plan: Record<ClientAuth, Mode[]>;
  served: Record<ClientAuth, number>;
  /** Every body sent, to prove the echo carried the secret. */
  sent: string[];
  close(): Promise<void>;
}

async function startEchoServer(): Promise<EchoServer> {
  const plan: Record<ClientAuth, Mode[]> = { client_secret_post: [], client_secret_basic: [] };
  const served: Record<ClientAuth, number> = { client_secret_post: 0, client_secret_basic: 0 };
  const sent: string[] = [];
  const server: Server = createServer((req: IncomingMessage, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const r: Echoed = {
        rawHeaders: req.rawHeaders.map((v, i) => (i % 2 === 0 ? `${v}: ` : `${v}\n`)).join(''),
        body: Buffer.concat(chunks).toString('utf8'),
        authorization: req.headers.authorization,
      };
      const auth: ClientAuth = r.authorization === undefined ? 'client_secret_post' : 'client_secret_basic';
      if (plan[auth].length === 0) plan[auth].push(...ALL_MODES);
      const mode = plan[auth].shift()!;
      served[auth]++;
      const echo = ECHOES[mode.echo]!(r);
      const body = mode.format === 'json'
        ? JSON.stringify({ error: 'invalid_client', error_description: `${mode.echo}: ${echo}` })
        : `echo of the request (${mode.echo}):\n${echo}\n`;
      sent.push(body);
      res.writeHead(mode.status, { 'content-type': mode.format === 'json' ? 'application/json' : 'text/plain; charset=utf-8' }).end(body);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/token`,
    plan,
    served,
    sent,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

let echo: EchoServer;
let dispatcher: Agent;
before(async () => {
  echo = await startEchoServer();
  dispatcher = new Agent();
});
after(async () => {
  await dispatcher.close();
  await echo.close();
});

function profile(clientAuth: ClientAuth): ProfileConfig {
  return testProfile({
    name: 'echo', tokenUrl: echo.url, clientId: fixed(CLIENT_ID), clientSecret: fixed(SECRET), clientAuth, scope: 'api://orders/.default', timeoutMs: 5000,
  });
}

describe('an endpoint echoing the request in its error body', () => {
  for (const clientAuth of ['client_secret_post', 'client_secret_basic'] as const) {
    test(`${clientAuth}: every status, format and echo gives an error without any encoding of the secret`, async () => {
      const source = new TokenSource(profile(clientAuth), { dispatcher, clock: new FakeClock() });
      echo.plan[clientAuth].push(...ALL_MODES);
      const sentBefore = echo.sent.length;
      for (const mode of ALL_MODES) {
        const err = await source.fetch().then(() => assert.fail('expected a failure'), (e: unknown) => e);
        assert.ok(err instanceof TokenFetchError, inspect(err));
        const where = `${mode.status} ${mode.format} ${mode.echo}`;
        for (const text of [err.message, JSON.stringify(err), inspect(err, { depth: Infinity, showHidden: true })]) assertClean(text, where);

        if (mode.format === 'json') {
          // The endpoint's own words survive, masked: the echo's name and the OAuth2 error.
          const e = err as TokenEndpointError | TokenResponseError;
          assert.equal(e.oauthError, 'invalid_client', where);
          assert.ok(e.oauthErrorDescription?.startsWith(`${mode.echo}: `), `${where}: ${e.oauthErrorDescription}`);
        } else if (mode.status === 200) {
          assert.equal(err.message, 'token response is not JSON (HTTP 200, text/plain; charset=utf-8)');
        } else {
          // A body that is not an OAuth2 error is never quoted: only what answered, and its size.
          const bytes = Buffer.byteLength(echo.sent[sentBefore + ALL_MODES.indexOf(mode)]!);
          assert.equal(err.message, `token endpoint answered HTTP ${mode.status} (no OAuth2 error body; text/plain; charset=utf-8, ${bytes} bytes)`);
        }
      }
      // The test can fail: the endpoint did send the secret back, in many encodings.
      const echoed = echo.sent.slice(sentBefore).join('\n');
      const present = forbidden().filter((needle) => echoed.includes(needle));
      assert.ok(present.length >= (clientAuth === 'client_secret_basic' ? 10 : 7), `the echo carried only ${present.length} encodings`);
    });
  }

  test('the masked description still reads: what was around the secret stays', async () => {
    const source = new TokenSource(profile('client_secret_post'), { dispatcher, clock: new FakeClock() });
    echo.plan.client_secret_post.push({ status: 400, format: 'json', echo: 'json' });
    const err = await source.fetch().then(() => assert.fail('expected a failure'), (e: unknown) => e as TokenEndpointError);
    assert.equal(err.oauthErrorDescription, 'json: {"form":{"grant_type":"client_credentials","scope":"api://orders/.default","client_id":"echo:client","client_secret":"[redacted]"}}');
  });
});

describe('the sidecar at trace level and the token command', () => {
  test('print no encoding of the secret, for either client auth method', async () => {
    const config = {
      logging: { level: 'trace' },
      profiles: Object.fromEntries((['client_secret_post', 'client_secret_basic'] as const).map((clientAuth) => [clientAuth, {
        tokenUrl: echo.url,
        clientId: CLIENT_ID,
        clientSecret: '${ECHO_SECRET}',
        clientAuth,
        refresh: { minBackoffSeconds: 0.05, maxBackoffSeconds: 0.05 },
      }])),
    };
    const env = { ECHO_SECRET: SECRET };
    const sentBefore = echo.sent.length;
    const served = { ...echo.served };
    const sidecar = await startSidecar({ config, env, waitReady: false });
    try {
      // Every mode, for both profiles.
      await sidecar.waitForLog(() => echo.served.client_secret_post - served.client_secret_post > ALL_MODES.length
        && echo.served.client_secret_basic - served.client_secret_basic > ALL_MODES.length, 60_000);
    } finally {
      await sidecar.stop();
    }
    const logs = sidecar.logs();
    assert.ok(logs.filter((l) => l.msg === 'token fetch failed').length >= 2 * ALL_MODES.length);
    assertClean([...sidecar.stdout, ...sidecar.stderr].join('\n'), 'the sidecar output');
    assert.ok(forbidden().some((needle) => echo.sent.slice(sentBefore).join('\n').includes(needle)));

    // One `token` run per status and format, for each method; the echo the most telling ones.
    const file = writeConfig(config);
    for (const clientAuth of ['client_secret_post', 'client_secret_basic'] as const) {
      for (const status of STATUSES) {
        for (const [format, e] of [['json', 'json'], ['json', 'rawHeaders'], ['text', 'rawForm']] as const) {
          echo.plan[clientAuth].unshift({ status, format, echo: e });
          const out = await runCli(['token', '--config', file, '--profile', clientAuth], env);
          assert.equal(out.code, 1, out.stderr);
          assert.match(out.stderr, /^status: failed$/m);
          assertClean(out.stdout + out.stderr, `token ${clientAuth} ${status} ${format} ${e}`);
        }
      }
    }
  });
});

describe('mask(): raw secrets in, every encoding out', () => {
  test('a whole Basic value passed as the secret masks its base64, its pair and the secret inside', () => {
    const pair = `${formEncode(CLIENT_ID)}:${formEncode(SECRET)}`;
    const basic = `Basic ${Buffer.from(pair).toString('base64')}`;
    const text = `got ${basic} i.e. ${pair}, secret ${SECRET} or ${JSON.stringify(SECRET)}`;
    assert.equal(mask(text, [basic]), 'got [redacted] i.e. [redacted], secret [redacted] or "[redacted]"');
  });

  test('encodings that overlap or differ in case leave no tail; text around them stays', () => {
    const secret = 'a+b c/d"é';
    const text = [
      `x=${formEncode(secret).toLowerCase()}`,
      `y=${encodeURIComponent(secret)}`,
      `z=${encodeURIComponent(formEncode(secret))}`,
      `h=${secret.replace(/"/g, '&quot;')}`,
      `b=${Buffer.from(secret).toString('base64url')}`,
      `j=${asciiJson(secret)}`,
    ].join(' ');
    assert.equal(mask(text, [secret]), 'x=[redacted] y=[redacted] z=[redacted] h=[redacted] b=[redacted] j="[redacted]"');
    assert.equal(mask('nothing secret here', [secret]), 'nothing secret here');
    assert.equal(mask('empty secrets are skipped', ['']), 'empty secrets are skipped');
  });
});
