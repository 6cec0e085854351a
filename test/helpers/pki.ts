// A throw-away PKI for tests, made with the openssl CLI: a CA, a server certificate for
// 127.0.0.1/localhost, and client certificates whose keys come in the PEM forms people have
// (PKCS#8 RSA, PKCS#1 RSA, SEC1 EC P-256). Everything lives in one temp folder.
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface Issued {
  keyFile: string;
  certFile: string;
  key: string;
  cert: string;
}

export interface Pki {
  dir: string;
  ca: Issued;
  server: Issued;
  /** A client certificate signed by the CA, with its key in the given form. */
  client(name: string, keyForm: 'rsa-pkcs8' | 'rsa-pkcs1' | 'ec-sec1' | 'ec-pkcs8', cn?: string): Issued;
  /** A second, unrelated CA (for "not trusted" cases). */
  otherCa(): Issued;
  /**
   * Writes `issued`'s key and certificate to `<name>.key` and `<name>.crt` (over what is there:
   * a rotation on disk) and returns them, for tests that change the files under a running source.
   */
  copy(issued: Issued, name: string): Issued;
  remove(): void;
}

function openssl(args: string[], cwd: string): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

export function createPki(): Pki {
  const dir = mkdtempSync(join(tmpdir(), 'oauth2-extproc-pki-'));
  const read = (name: string): Issued => ({
    keyFile: join(dir, `${name}.key`),
    certFile: join(dir, `${name}.crt`),
    key: readFileSync(join(dir, `${name}.key`), 'utf8'),
    cert: readFileSync(join(dir, `${name}.crt`), 'utf8'),
  });
  const selfSigned = (name: string, cn: string): Issued => {
    openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.crt`, '-days', '2',
      '-subj', `/CN=${cn}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'], dir);
    return read(name);
  };
  const sign = (name: string, cn: string, ext: string): void => {
    writeFileSync(join(dir, `${name}.ext`), ext);
    openssl(['req', '-new', '-key', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`], dir);
    openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial', '-out', `${name}.crt`,
      '-days', '2', '-extfile', `${name}.ext`], dir);
  };

  const ca = selfSigned('ca', 'oauth2-extproc test CA');
  openssl(['genpkey', '-algorithm', 'RSA', '-pkeyopt', 'rsa_keygen_bits:2048', '-out', 'server.key'], dir);
  sign('server', '127.0.0.1', 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n');
  const server = read('server');
  let others = 0;

  return {
    dir,
    ca,
    server,
    client(name, keyForm, cn = name) {
      if (keyForm === 'rsa-pkcs8') openssl(['genpkey', '-algorithm', 'RSA', '-pkeyopt', 'rsa_keygen_bits:2048', '-out', `${name}.key`], dir);
      else if (keyForm === 'rsa-pkcs1') openssl(['genrsa', '-traditional', '-out', `${name}.key`, '2048'], dir);
      else if (keyForm === 'ec-sec1') openssl(['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', `${name}.key`], dir);
      else openssl(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', `${name}.key`], dir);
      sign(name, cn, 'extendedKeyUsage=clientAuth\n');
      return read(name);
    },
    otherCa() {
      return selfSigned(`other-ca-${++others}`, 'some other CA');
    },
    copy(issued, name) {
      const copied = { ...issued, keyFile: join(dir, `${name}.key`), certFile: join(dir, `${name}.crt`) };
      copyFileSync(issued.keyFile, copied.keyFile);
      copyFileSync(issued.certFile, copied.certFile);
      return copied;
    },
    remove() {
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
