// A Clock whose time moves only when a test says so. advance() fires every timer that falls
// due, in order of due time (then of creation), with now() set to that timer's moment, and lets
// promise callbacks settle after each one, so code awaiting a fetch sees a consistent time.
import type { Clock, Timer } from '../../src/clock.ts';

export class FakeTimer implements Timer {
  readonly at: number;
  readonly seq: number;
  readonly fn: () => void;
  refed = true;

  constructor(at: number, seq: number, fn: () => void) {
    this.at = at;
    this.seq = seq;
    this.fn = fn;
  }

  unref(): void {
    this.refed = false;
  }
}

export class FakeClock implements Clock {
  #now: number;
  #seq = 0;
  readonly #timers = new Set<FakeTimer>();

  /** Starts at a fixed, whole-second moment so ISO strings in assertions are stable. */
  constructor(start = Date.UTC(2030, 0, 1, 12, 0, 0)) {
    this.#now = start;
  }

  now(): number {
    return this.#now;
  }

  setTimeout(fn: () => void, ms: number): FakeTimer {
    const timer = new FakeTimer(this.#now + Math.max(0, ms), this.#seq++, fn);
    this.#timers.add(timer);
    return timer;
  }

  clearTimeout(timer: Timer): void {
    this.#timers.delete(timer as FakeTimer);
  }

  /** Timers not yet fired nor cleared, soonest first. */
  pending(): FakeTimer[] {
    return [...this.#timers].sort((a, b) => a.at - b.at || a.seq - b.seq);
  }

  /** Moves time forward by `ms`, firing due timers in order. */
  async advance(ms: number): Promise<void> {
    await this.advanceTo(this.#now + ms);
  }

  /** Moves time to `target` (ms since the epoch), firing due timers in order. */
  async advanceTo(target: number): Promise<void> {
    if (target < this.#now) throw new Error('a fake clock does not go back');
    await settle();
    for (let next = this.pending()[0]; next !== undefined && next.at <= target; next = this.pending()[0]) {
      this.#timers.delete(next);
      this.#now = next.at;
      next.fn();
      await settle();
    }
    this.#now = target;
  }
}

/** Lets every queued promise callback run (a macrotask turn drains the microtask queue). */
export function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
