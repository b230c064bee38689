// Writers, changers and a checker running at once against one database, for
// the rollup exactness tests: everything keeps going for `ms` and until the
// checker has compared at least `minChecks` times while they ran, so a busy
// machine makes the comparisons slower, never the test's verdict different.
// The first error stops every loop.
import type pg from "pg";

/** Deadlocks and serialization failures: a concurrent writer retries or skips, the test goes on. */
export const transient = (err: unknown) => ["40P01", "40001"].includes((err as { code?: string }).code ?? "");

export function concurrentRun(o: { ms: number; minChecks: number }) {
  const deadline = Date.now() + o.ms;
  const errors: string[] = [];
  const problems: string[] = [];
  let checks = 0;
  const running = () => errors.length === 0 && (Date.now() < deadline || checks < o.minChecks);
  /** Runs `body`, recording its failure under `name` (which stops the others). */
  const guard = (name: string, body: () => Promise<void>) =>
    body().catch((err) => {
      errors.push(`${name}: ${(err as Error).message}`);
    });
  /** On one client while running: `compare` returns the differences it found (none: exact). */
  const checker = (pool: pg.Pool, compare: (client: pg.PoolClient) => Promise<string[]>) =>
    guard("check", async () => {
      const client = await pool.connect();
      try {
        while (running()) {
          problems.push(...(await compare(client)));
          checks++;
        }
      } finally {
        client.release();
      }
    });
  return { running, guard, checker, errors, problems, checks: () => checks };
}
