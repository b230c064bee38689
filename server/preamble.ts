/**
 * Imported first by the entry points (index.ts, main.ts), before anything from
 * PostGraphile is evaluated.
 *
 * - Promise.withResolvers: grafast calls it, Node only has it from 22; without
 *   it every GraphQL request fails with a 500 on Node 20.
 * - GRAPHILE_ENV: read by grafast when its module loads; follows APP_ENV unless
 *   set (development adds checks and unmasked errors; production masks them).
 */
type WithResolvers = <T>() => {
  promise: Promise<T>;
  resolve: (value: T | PromiseLike<T>) => void;
  reject: (reason?: unknown) => void;
};

const P = Promise as unknown as { withResolvers?: WithResolvers };

if (typeof P.withResolvers !== "function") {
  P.withResolvers = function withResolvers<T>() {
    let resolve!: (value: T | PromiseLike<T>) => void;
    let reject!: (reason?: unknown) => void;
    const promise = new Promise<T>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    return { promise, resolve, reject };
  };
}

if (!process.env.GRAPHILE_ENV) {
  process.env.GRAPHILE_ENV = process.env.APP_ENV === "production" ? "production" : "development";
}

export {};
