// One readiness for everything that asks: /readyz, the gRPC health service (Kubernetes grpc
// probes, Envoy health checks, in this process or pushed to every worker) and the `ready` log
// line. Each is told of a change by update(), and /readyz re-evaluates before it answers, so
// what the probes say and what requests get come from the same state.
//
// Ready = not draining, and
// - every `onFailure: deny` profile holds a usable token (its requests are denied without one);
// - every `onFailure: allow` profile holds one or has finished its first fetch: it serves its
//   requests without a token, so taking the pod out of service would only turn a degraded
//   route into a dead one (details() still says `no_token`, and the fetch failure is logged);
// - with `server.workers` above 1, at least one worker serves the port (fewer than configured
//   is less capacity, not an outage; details() counts them and their restarts).

export interface ProfileStatus {
  readonly name: string;
  /** `onFailure: allow`: requests continue without a token. */
  readonly failOpen: boolean;
  /** Whether the profile has a usable token now. */
  hasToken(): boolean;
  /** Whether the profile's first fetch has ended, with a token or not. */
  tried(): boolean;
}

export interface WorkerStatus {
  readonly configured: number;
  /** Workers listening on the port now. */
  serving(): number;
  /** Workers started again after one exited, since start. */
  restarts(): number;
}

export type ProfileState = 'token' | 'no_token';

export interface ReadinessDetails {
  ready: boolean;
  draining: boolean;
  profiles: Record<string, ProfileState>;
  workers?: { configured: number; serving: number; restarts: number };
}

export class Readiness {
  private readonly profiles: readonly ProfileStatus[];
  private readonly workers: WorkerStatus | undefined;
  private draining = false;
  private readonly listeners: Array<(ready: boolean) => void> = [];
  private last: boolean | undefined;

  constructor(profiles: readonly ProfileStatus[], options: { workers?: WorkerStatus } = {}) {
    this.profiles = profiles;
    this.workers = options.workers;
  }

  isReady(): boolean {
    if (this.draining) return false;
    if (this.workers !== undefined && this.workers.serving() === 0) return false;
    return this.profiles.every((p) => p.hasToken() || (p.failOpen && p.tried()));
  }

  isDraining(): boolean {
    return this.draining;
  }

  /** Per-profile view for /readyz, so an operator sees which profile is missing its token. */
  details(): ReadinessDetails {
    const profiles: Record<string, ProfileState> = {};
    for (const p of this.profiles) profiles[p.name] = p.hasToken() ? 'token' : 'no_token';
    const details: ReadinessDetails = { ready: this.isReady(), draining: this.draining, profiles };
    if (this.workers !== undefined) {
      details.workers = { configured: this.workers.configured, serving: this.workers.serving(), restarts: this.workers.restarts() };
    }
    return details;
  }

  /** /readyz: re-evaluates first (telling the listeners of a change), so every probe agrees. */
  check(): ReadinessDetails {
    this.update();
    return this.details();
  }

  /** Called with the new state each time it changes. */
  onChange(listener: (ready: boolean) => void): void {
    this.listeners.push(listener);
  }

  startDraining(): void {
    this.draining = true;
    this.update();
  }

  /** Re-evaluate after a token arrived or became unusable, a fetch ended, or a worker came or went. */
  update(): void {
    const ready = this.isReady();
    if (ready === this.last) return;
    this.last = ready;
    for (const listener of this.listeners) listener(ready);
  }
}
