// One readiness for everything that asks: /readyz, the gRPC health service (Kubernetes grpc
// probes, Envoy health checks) and the `ready` log line. Ready = every profile holds a usable
// token and the process is not draining.

export interface ProfileStatus {
  readonly name: string;
  /** Whether the profile has a usable token now. */
  hasToken(): boolean;
}

export class Readiness {
  private readonly profiles: readonly ProfileStatus[];
  private draining = false;
  private readonly listeners: Array<(ready: boolean) => void> = [];
  private last: boolean | undefined;

  constructor(profiles: readonly ProfileStatus[]) {
    this.profiles = profiles;
  }

  isReady(): boolean {
    return !this.draining && this.profiles.every((p) => p.hasToken());
  }

  isDraining(): boolean {
    return this.draining;
  }

  /** Per-profile view for /readyz, so an operator sees which profile is missing its token. */
  details(): { ready: boolean; draining: boolean; profiles: Record<string, 'token' | 'no_token'> } {
    const profiles: Record<string, 'token' | 'no_token'> = {};
    for (const p of this.profiles) profiles[p.name] = p.hasToken() ? 'token' : 'no_token';
    return { ready: this.isReady(), draining: this.draining, profiles };
  }

  /** Called with the new state each time it changes. */
  onChange(listener: (ready: boolean) => void): void {
    this.listeners.push(listener);
  }

  startDraining(): void {
    this.draining = true;
    this.update();
  }

  /** Re-evaluate after a token arrived or became unusable. */
  update(): void {
    const ready = this.isReady();
    if (ready === this.last) return;
    this.last = ready;
    for (const listener of this.listeners) listener(ready);
  }
}
