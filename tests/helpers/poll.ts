// The one way a test waits for something that happens asynchronously (a row
// recorded after the response, a worker job, a backend blocked on a lock).
//
// The time limit only turns a hang into a failure with a name; it is never
// what a test measures. So it is far above what a slow, busy machine needs
// (both cores taken by other work): a passing test never comes near it.

export const POLL_TIMEOUT_MS = 60_000;

export interface PollOptions {
  /** Give up (and fail, naming `what`) after this long. */
  timeoutMs?: number;
  /** Pause between two tries. */
  intervalMs?: number;
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

type Truthy<T> = Exclude<T, false | 0 | "" | null | undefined>;

/** Calls fn until it returns a truthy value, and returns that value. */
export async function waitFor<T>(
  what: string,
  fn: () => T | Promise<T>,
  { timeoutMs = POLL_TIMEOUT_MS, intervalMs = 25 }: PollOptions = {},
): Promise<Truthy<T>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await fn();
    if (value) return value as Truthy<T>;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}
