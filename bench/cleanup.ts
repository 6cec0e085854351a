// Every process the bench starts is registered here and killed if the bench itself ends early
// (an error, Ctrl-C), so no Envoy or server is left running on the machine.
import type { ChildProcess } from 'node:child_process';

const children = new Set<ChildProcess>();
let installed = false;

export function track(child: ChildProcess): ChildProcess {
  children.add(child);
  child.once('exit', () => children.delete(child));
  if (!installed) {
    installed = true;
    process.once('exit', () => {
      for (const c of children) c.kill('SIGKILL');
    });
    for (const signal of ['SIGINT', 'SIGTERM'] as const) {
      process.once(signal, () => {
        for (const c of children) c.kill('SIGKILL');
        process.exit(130);
      });
    }
  }
  return child;
}
