/**
 * A grafast `prepareArgs` middleware that calls `after` with the prepared
 * arguments (their contextValue included) once the rest of the chain has
 * prepared them, whether it did so synchronously or with a promise. The read
 * replica (readReplica.ts) and the Citus settings (citusSettings.ts) both wrap
 * the context's withPgClient there.
 */
type PrepareArgs = NonNullable<NonNullable<NonNullable<GraphileConfig.Plugin["grafast"]>["middleware"]>["prepareArgs"]>;

export function afterPrepareArgs(after: (args: unknown) => void): PrepareArgs {
  return (next, event) => {
    const result = next();
    if (result && typeof (result as PromiseLike<unknown>).then === "function") {
      return (result as PromiseLike<typeof result>).then((value) => {
        after(event.args);
        return value;
      }) as typeof result;
    }
    after(event.args);
    return result;
  };
}
