// Real backend frameworks behind the shipped envoy/envoy.yaml (addresses rewritten only): PHP's
// built-in web server and a Python WSGI app (wsgiref), with the real sidecar and OAuth2 server,
// attacked over HTTP/1.1 and HTTP/2. A leak is judged by what the framework READ: the names an
// application looks the key up by ($_GET['subscription-key'], HTTP_OCP_APIM_SUBSCRIPTION_KEY,
// parse_qs(...)['subscription-key']), the Authorization it would trust, and the path it routes
// on; then, stronger, the key's value must be nowhere in what it parsed, under any name.
import { after, before, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { connect, type ClientHttp2Session } from 'node:http2';
import { startOAuthServer, type OAuthServer } from '../helpers/oauth-server.ts';
import { startSidecar, type SidecarProcess } from '../helpers/sidecar.ts';
import { defaultAndReports } from '../helpers/e2e-stack.ts';
import { ENVOY_MISSING, findEnvoy, send, startEnvoy, type EnvoyProcess } from '../helpers/envoy.ts';
import { findPhp, PHP_MISSING, startPhpBackend, type FrameworkBackend } from '../helpers/php-backend.ts';
import { findPython, PYTHON_MISSING, startWsgiBackend } from '../helpers/wsgi-backend.ts';

const noEnvoy = findEnvoy() === undefined && !process.env.CI ? ENVOY_MISSING : false;
const FRAMEWORKS = {
  php: { skip: noEnvoy || (findPhp() === undefined ? PHP_MISSING : false), start: () => startPhpBackend() },
  wsgi: { skip: noEnvoy || (findPython() === undefined ? PYTHON_MISSING : false), start: () => startWsgiBackend() },
} as const;
type Framework = keyof typeof FRAMEWORKS;

const KEY = 'caller-subscription-key-7d41e0';
const FORGED = 'forged-by-the-caller-93b1';
const DEFAULT_AUDIENCE = 'https://upstream.test';
const REPORTS_AUDIENCE = 'https://reports.test';

let idp: OAuthServer | undefined;
let sidecar: SidecarProcess | undefined;
const stacks = new Map<Framework, { backend: FrameworkBackend; envoy: EnvoyProcess; h2: ClientHttp2Session }>();

before(async () => {
  if (FRAMEWORKS.php.skip && FRAMEWORKS.wsgi.skip) return;
  idp = await startOAuthServer();
  sidecar = await startSidecar({
    config: {
      profiles: defaultAndReports(idp),
    },
  });
  for (const [name, framework] of Object.entries(FRAMEWORKS) as Array<[Framework, (typeof FRAMEWORKS)[Framework]]>) {
    if (framework.skip) continue;
    const backend = await framework.start();
    const envoy = await startEnvoy({ config: 'envoy.yaml', clusters: { oauth2_extproc: sidecar.grpcAddress, backend: backend.address } });
    stacks.set(name, { backend, envoy, h2: connect(envoy.url) });
  }
});

after(async () => {
  for (const { backend, envoy, h2 } of stacks.values()) {
    h2.close();
    await envoy.stop();
    await backend.close();
  }
  await sidecar?.stop();
  await idp?.close();
});

type Protocol = 'HTTP/1.1' | 'HTTP/2';

/** What came back: Envoy refused the request (a 4xx, or a reset HTTP/2 stream), or the backend's reading of it. */
type Outcome = { refused: string } | { read: Record<string, any> };

async function request(framework: Framework, protocol: Protocol, path: string, headers: string[]): Promise<Outcome> {
  const stack = stacks.get(framework)!;
  let status: number;
  let body: string;
  if (protocol === 'HTTP/1.1') {
    ({ status, body } = await send(`${stack.envoy.url}${path}`, { headers }));
  } else {
    const h2Headers: Record<string, string | string[]> = { ':method': 'GET', ':path': path };
    for (let i = 0; i < headers.length; i += 2) {
      const name = headers[i]!.toLowerCase();
      const before = h2Headers[name];
      h2Headers[name] = before === undefined ? headers[i + 1]! : [before, headers[i + 1]!].flat();
    }
    const reply = await new Promise<{ status: number; body: string } | { reset: string }>((resolve) => {
      const stream = stack.h2.request(h2Headers, { endStream: true });
      let status = 0;
      const chunks: Buffer[] = [];
      stream.on('response', (h) => (status = Number(h[':status'])));
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => resolve({ status, body: Buffer.concat(chunks).toString('utf8') }));
      stream.on('error', (err: Error) => resolve({ reset: err.message }));
    });
    if ('reset' in reply) return { refused: `stream reset: ${reply.reset}` };
    ({ status, body } = reply);
  }
  if (status >= 400 && status < 500) return { refused: `${status} ${body.slice(0, 80)}` };
  assert.equal(status, 200, body);
  return { read: JSON.parse(body) };
}

/** Where `needle` occurs in a parsed reply, as paths (`get.subscription-key[0]`), keys included. */
function occurrences(value: unknown, needle: string, at = ''): string[] {
  if (typeof value === 'string') return value.includes(needle) ? [at] : [];
  if (value === null || typeof value !== 'object') return [];
  return Object.entries(value).flatMap(([k, v]) => [
    ...(k.includes(needle) ? [`${at}[key ${JSON.stringify(k)}]`] : []),
    ...occurrences(v, needle, at === '' ? k : `${at}.${k}`),
  ]);
}

function caseInsensitive(record: Record<string, unknown> | undefined, name: string): unknown {
  return Object.entries(record ?? {}).find(([k]) => k.toLowerCase() === name)?.[1];
}

/** The path the application routes on, as a router would resolve it (decoded, dot segments resolved). */
function routedPath(framework: Framework, read: Record<string, any>): string {
  // PHP routers (Laravel, Symfony, Slim) decode REQUEST_URI's path; WSGI gives PATH_INFO decoded.
  const decoded = framework === 'php'
    ? decodeURIComponent(String(read.server.REQUEST_URI).split('?')[0]!)
    : String(read.environ.PATH_INFO);
  return new URL(decoded.replaceAll('?', '%3F').replaceAll('#', '%23'), 'http://backend').pathname;
}

/** Every value the application would take for the caller's credentials, by the names it reads them by. */
function lookups(framework: Framework, read: Record<string, any>): { key: Record<string, unknown>; authorization: unknown[] } {
  if (framework === 'php') {
    return {
      key: {
        "$_GET['subscription-key']": read.get?.['subscription-key'],
        "$_REQUEST['subscription-key']": read.request?.['subscription-key'],
        "$_SERVER['HTTP_OCP_APIM_SUBSCRIPTION_KEY']": read.server.HTTP_OCP_APIM_SUBSCRIPTION_KEY,
        "getallheaders()['Ocp-Apim-Subscription-Key']": caseInsensitive(read.headers, 'ocp-apim-subscription-key'),
      },
      authorization: [read.server.HTTP_AUTHORIZATION, caseInsensitive(read.headers, 'authorization'), read.server.PHP_AUTH_USER, read.server.PHP_AUTH_DIGEST].filter((v) => v !== undefined),
    };
  }
  return {
    key: {
      "environ['HTTP_OCP_APIM_SUBSCRIPTION_KEY']": read.environ.HTTP_OCP_APIM_SUBSCRIPTION_KEY,
      "parse_qs(QUERY_STRING)['subscription-key']": read.query['subscription-key'],
      "parse_qs(QUERY_STRING, separator=';')['subscription-key']": read.query_semicolon['subscription-key'],
    },
    authorization: [read.environ.HTTP_AUTHORIZATION].filter((v) => v !== undefined),
  };
}

/**
 * The promise, judged by what the framework read: no subscription key under any name it looks
 * it up by, nor anywhere else it parsed; no caller-made Authorization; and a token of the
 * profile of the route the application routes the request to (none only on the bare /healthz).
 */
async function assertHeld(framework: Framework, protocol: Protocol, path: string, headers: string[] = [], mustReach = false): Promise<void> {
  const outcome = await request(framework, protocol, path, headers);
  if ('refused' in outcome) {
    // Refused by Envoy is held too, but not where a refusal would only hide the sidecar's work.
    assert.ok(!mustReach, `${protocol} ${path}: refused (${outcome.refused}), expected to reach ${framework}`);
    return;
  }
  const { read } = outcome;
  const what = `${protocol} ${path} ${JSON.stringify(headers)}`;
  const { key, authorization } = lookups(framework, read);
  for (const [lookup, value] of Object.entries(key)) assert.equal(value, undefined, `${what}: ${lookup} is set`);
  assert.deepEqual(occurrences(read, KEY), [], `${what}: the key is in what ${framework} read`);
  assert.deepEqual(occurrences(read, FORGED), [], `${what}: the forged credential is in what ${framework} read`);

  const routed = routedPath(framework, read);
  if (routed === '/healthz' && authorization.length === 0) return;
  assert.equal(authorization.length === 0 ? 'none' : 'some', 'some', `${what}: no authorization on ${routed}`);
  for (const value of authorization.slice(0, 2)) {
    const m = /^Bearer ([\w-]+\.[\w-]+\.[\w-]+)$/.exec(String(value));
    assert.ok(m, `${what}: authorization ${String(value).slice(0, 20)}… is not one Bearer JWT`);
    const audience = routed.startsWith('/reports/') ? REPORTS_AUDIENCE : DEFAULT_AUDIENCE;
    const claims = await idp!.verify(m[1]!, audience).catch((err: Error) => assert.fail(`${what}: routed to ${routed}, token not for ${audience}: ${err.message}`));
    assert.equal(claims.aud, audience);
  }
}

const ROUTES = ['/orders/42', '/reports/monthly', '/healthz'];
const PROTOCOLS: Protocol[] = ['HTTP/1.1', 'HTTP/2'];

// Header names that CGI, PHP and WSGI all read as HTTP_OCP_APIM_SUBSCRIPTION_KEY.
const KEY_HEADERS = [
  'Ocp-Apim-Subscription-Key', 'ocp_apim_subscription_key', 'OCP_APIM_SUBSCRIPTION_KEY', 'Ocp-Apim_Subscription-Key',
  'ocp_apim-subscription_key', 'ocp-apim-subscription_key',
];

// Query strings whose name some widely used framework reads as subscription-key (the note after
// each says who); the sidecar must remove them all.
const KEY_QUERIES: Array<[string, string]> = [
  [`subscription-key=${KEY}`, 'the name itself'],
  [`Subscription-Key=${KEY}`, 'ASP.NET, case-insensitive'],
  [`SUBSCRIPTION-KEY=${KEY}&page=2`, 'ASP.NET'],
  [`subscription%2Dkey=${KEY}`, 'every framework decodes once'],
  [`%73ubscription-key=${KEY}`, 'every framework decodes once'],
  [`+subscription-key=${KEY}`, 'PHP drops leading spaces (+ is a space)'],
  [`%20subscription-key=${KEY}`, 'PHP drops leading spaces'],
  [`%09subscription-key=${KEY}`, 'frameworks that trim whitespace'],
  [`subscription-key%00=${KEY}`, 'PHP cuts a name at NUL'],
  [`subscription-key%00ignored=${KEY}`, 'PHP cuts a name at NUL'],
  [`subscription-key[]=${KEY}`, 'PHP, Rack and qs read an array'],
  [`subscription-key[0]=${KEY}`, 'PHP, Rack and qs read an array'],
  [`subscription-key%5B%5D=${KEY}`, 'PHP decodes, then reads an array'],
  [`subscription-key%5b0%5d=${KEY}`, 'PHP decodes, then reads an array'],
  [`subscription-key[x]=${KEY}`, 'PHP reads a map'],
  [`subscription-key[=${KEY}`, 'qs reads an unclosed bracket as the name'],
  [`[subscription-key]=${KEY}`, 'Rack 2 and qs drop a leading ['],
  [`subscription-key]x=${KEY}`, 'Rack 2 ends the name at ]'],
  [`subscription-key.x=${KEY}`, 'qs with allowDots, ASP.NET and Spring binding'],
  [`!subscription-key=${KEY}`, 'Spring WebDataBinder default-value prefix'],
  [`%u0073ubscription-key=${KEY}`, 'System.Web decodes %uXXXX'],
  [`a=1;subscription-key=${KEY}`, 'Rack 2, Go before 1.17, Python before 3.9.2 split on ;'],
  [`a=1&subscription-key=${KEY}&subscription-key=${KEY}-2`, 'repeated'],
  [`subscription%252Dkey=${KEY}`, 'a framework that decodes twice'],
  [`%2573ubscription-key=${KEY}`, 'a framework that decodes twice'],
  [`%C5%BFubscription-key=${KEY}`, 'U+017F long s upper-cases to S (.NET, Java)'],
  [`subscription-%E2%84%AAey=${KEY}`, 'U+212A Kelvin sign lower-cases to k (Java, JavaScript)'],
  [`subscr%C4%B1ption-key=${KEY}`, 'U+0131 dotless i upper-cases to I (.NET, Java)'],
  [`subscr%C4%B0ption-key=${KEY}`, 'U+0130 dotted I lower-cases to i (Java)'],
  [`subscription-key${'x'.repeat(2000)}=${KEY}`, 'a name too long to read further'],
];

for (const framework of Object.keys(FRAMEWORKS) as Framework[]) {
  const { skip } = FRAMEWORKS[framework];

  test(`${framework}: a key header under any mix of _ and - never reaches the application, on every route`, { skip }, async (t: TestContext) => {
    for (const protocol of PROTOCOLS) {
      for (const route of ROUTES) {
        for (const name of KEY_HEADERS) {
          await t.test(`${protocol} ${route} ${name}`, () => assertHeld(framework, protocol, route, [name, KEY], !name.includes('_')));
        }
        await t.test(`${protocol} ${route} both spellings at once`, () => assertHeld(framework, protocol, route, ['ocp-apim-subscription-key', KEY, 'ocp_apim_subscription_key', `${KEY}-2`]));
      }
    }
  });

  test(`${framework}: a caller-made Authorization never reaches the application, on every route`, { skip }, async (t: TestContext) => {
    const basic = `Basic ${Buffer.from(`${FORGED}:pw`).toString('base64')}`;
    for (const protocol of PROTOCOLS) {
      for (const route of ROUTES) {
        for (const headers of [
          ['Authorization', `Bearer ${FORGED}`],
          ['authorization', basic],
          ['Authorization', `Bearer ${FORGED}`, 'AUTHORIZATION', `Bearer ${FORGED}-2`],
          ['Authorization', `Bearer ${FORGED}`, 'Ocp-Apim-Subscription-Key', KEY],
        ]) {
          const names = headers.filter((_, i) => i % 2 === 0);
          // node:http2 will not send a single-value header twice (ERR_HTTP2_HEADER_SINGLE_VALUE).
          const twice = protocol === 'HTTP/2' && new Set(names.map((n) => n.toLowerCase())).size < names.length;
          await t.test(`${protocol} ${route} ${names.join(', ')}`, { skip: twice && 'node:http2 sends authorization once' }, () => assertHeld(framework, protocol, route, headers, true));
        }
      }
    }
  });

  test(`${framework}: a query parameter read as subscription-key by some framework never reaches the application`, { skip }, async (t: TestContext) => {
    for (const protocol of PROTOCOLS) {
      for (const route of ROUTES) {
        for (const [query, who] of KEY_QUERIES) {
          await t.test(`${protocol} ${route}?${query.replace(KEY, 'KEY').replace(/x{20,}/, 'x…')} (${who})`, () => assertHeld(framework, protocol, `${route}?${query}`, [], true));
        }
      }
    }
  });

  test(`${framework}: dot segments and escaped slashes never carry the reports token to another route`, { skip }, async (t: TestContext) => {
    for (const protocol of PROTOCOLS) {
      for (const path of [
        '/reports/../orders', '/reports/./../orders', '/reports/%2E%2E/orders', '/reports/.%2e/orders',
        '/reports%2F..%2Forders', '/reports/..%2Forders', '/reports/..%2forders', '/reports%2f..%2forders',
        '/reports/..%5Corders', '/reports/..\\orders', '/reports/..%252Forders', '//reports/../orders',
        '/reports//../orders', '/healthz/../orders', '/healthz%2F..%2Forders', '/orders/../reports/monthly',
      ]) {
        await t.test(`${protocol} ${path}`, () => assertHeld(framework, protocol, `${path}?x=1`, ['Ocp-Apim-Subscription-Key', KEY]));
      }
    }
  });
}

// HTTP/2 carries :path as bytes; a WSGI server maps each byte to one character (latin-1), so
// what it read shows every byte: those above 0x7F, invalid UTF-8 included, must survive the
// removal of the key exactly. (PHP's built-in server drops a request line with such bytes.)
test('wsgi: over HTTP/2, the key is removed from a :path with bytes above 0x7F and every other byte stays', { skip: FRAMEWORKS.wsgi.skip }, async () => {
  const outcome = await request('wsgi', 'HTTP/2', `/orders/\u00e9\u00ff?q=\u00c3\u00a9\u00ff&subscription-key=${KEY}&r=%FF&s=\u00e9`, []);
  assert.ok('read' in outcome, JSON.stringify(outcome));
  assert.equal(outcome.read.environ.PATH_INFO, '/orders/\u00e9\u00ff');
  assert.equal(outcome.read.environ.QUERY_STRING, 'q=\u00c3\u00a9\u00ff&r=%FF&s=\u00e9');
  assert.deepEqual(occurrences(outcome.read, KEY), []);
});

// Through whichever backend runs here (the request target it received: PHP's REQUEST_URI, WSGI's PATH_INFO).
const ANY: Framework = FRAMEWORKS.php.skip ? 'wsgi' : 'php';
const received = (read: Record<string, any>): string => (ANY === 'php' ? read.server.REQUEST_URI : read.environ.PATH_INFO);

test('Envoy itself refuses header names with _ and escaped slashes, and resolves dot segments (the shipped config)', { skip: FRAMEWORKS[ANY].skip }, async () => {
  for (const protocol of PROTOCOLS) {
    for (const route of ROUTES) {
      // Also names no framework reads as ours (PHP: HTTP__OCP_…, HTTP_HTTP_AUTHORIZATION): any `_`.
      for (const name of ['ocp_apim_subscription_key', '_ocp-apim-subscription-key', 'http_authorization', 'x_anything']) {
        const refused = await request(ANY, protocol, route, [name, KEY]);
        assert.ok('refused' in refused, `${protocol} ${route}: the header name ${name} is refused`);
        if (protocol === 'HTTP/1.1') assert.match(refused.refused, /^400 /);
      }
    }
    for (const path of ['/reports%2F..%2Forders', '/reports/..%5Corders']) {
      const refused = await request(ANY, protocol, path, []);
      assert.ok('refused' in refused, `${protocol} ${path}: an escaped slash is refused`);
    }
    const resolved = await request(ANY, protocol, '/reports/../orders', []);
    assert.ok('read' in resolved);
    assert.equal(received(resolved.read), '/orders');
    const merged = await request(ANY, protocol, '//reports///monthly', []);
    assert.ok('read' in merged);
    assert.equal(received(merged.read), '/reports/monthly');
  }
});
