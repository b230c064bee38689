/**
 * A graphile-build plugin for PostGraphile's collection fields (connections,
 * and simple lists if they are ever enabled): a default and a maximum page
 * size, applied where the SQL is planned, so every request is bounded however
 * it reaches the schema.
 *
 * - Neither `first` nor `last` given (or given as null): `first` is the
 *   default page size; the SQL fetches that many rows plus one, so
 *   `pageInfo.hasNextPage` tells the client there is more.
 * - `first`/`last` above the maximum: the field fails with PAGE_SIZE_TOO_LARGE
 *   and runs no SQL. (Requests over HTTP are refused earlier, before execution,
 *   by the checks in limits.ts; this is the floor under them.)
 *
 * How: PostGraphile applies `first`/`last` through the arguments' `applyPlan`
 * (`$connection.setFirst($first)`), which only runs when the argument is in
 * the query. This plugin wraps the field's plan to set them itself, from both
 * arguments at once, and turns the arguments' own applyPlan into a no-op for
 * exactly those fields. The schema (SDL) does not change.
 *
 * It also marks the fields that scan (totalCount, the SQL functions behind
 * root query fields) with `extensions.keytrack.scan`, for the cost estimate.
 */
import type {} from "postgraphile";
import { constant, ConstantStep, lambda, SafeError, type Step } from "postgraphile/grafast";

import { LIMIT_CODES } from "./limits.js";

declare global {
  // eslint-disable-next-line @typescript-eslint/no-namespace
  namespace GraphileConfig {
    interface Plugins {
      KeytrackPageSizePlugin: true;
    }
  }
}

export interface PageSizeOptions {
  defaultPageSize: number;
  maxPageSize: number;
}

/** The steps PostGraphile's collection fields return (ConnectionStep, PgSelectStep). */
interface Paginated {
  setFirst(first: Step): void;
  setLast(last: Step): void;
}

function isPaginated(step: unknown): step is Paginated {
  return (
    typeof step === "object" &&
    step !== null &&
    typeof (step as Paginated).setFirst === "function" &&
    typeof (step as Paginated).setLast === "function"
  );
}

/** An argument absent from the query: getRaw gives constant(undefined) (or nothing: no such argument). */
function isAbsent($arg: Step | undefined): boolean {
  return $arg === undefined || ($arg instanceof ConstantStep && $arg.data === undefined);
}

export function makePageSizePlugin({ defaultPageSize, maxPageSize }: PageSizeOptions): GraphileConfig.Plugin {
  const check = (arg: "first" | "last", value: unknown): number | null => {
    if (value == null) return null;
    if (typeof value === "number" && value > maxPageSize) {
      throw new SafeError(
        `${arg}: ${value} asks for more than the largest page, ${maxPageSize} rows (GRAPHQL_MAX_PAGE_SIZE); fetch further pages with after/before.`,
        { code: LIMIT_CODES.pageSize, limit: maxPageSize, value },
      );
    }
    return value as number;
  };
  // One function each, so grafast can deduplicate the lambdas.
  const firstOrDefault = ([first, last]: readonly unknown[]): number | null => {
    const f = check("first", first);
    if (f !== null) return f;
    return last == null ? defaultPageSize : null;
  };
  const lastChecked = (last: unknown): number | null => check("last", last);

  /** Field scopes whose plan this plugin wrapped: only their first/last applyPlan is disabled. */
  const wrapped = new WeakSet<object>();

  return {
    name: "KeytrackPageSizePlugin",
    version: "1.0.0",
    description: "Default and maximum page sizes for collection fields; marks fields that scan",
    after: ["PgFirstLastBeforeAfterArgsPlugin"],
    schema: {
      hooks: {
        GraphQLObjectType_fields_field(field, _build, context) {
          const { scope } = context;
          if (scope.isPgConnectionTotalCountField || (scope.isRootQuery && scope.fieldBehaviorScope?.startsWith("queryField"))) {
            field = { ...field, extensions: { ...field.extensions, keytrack: { ...field.extensions?.keytrack, scan: true } } };
          }
          if (!(scope.isPgFieldConnection || scope.isPgFieldSimpleCollection) || typeof field.plan !== "function") {
            return field;
          }
          const plan = field.plan;
          wrapped.add(scope);
          return {
            ...field,
            plan(...args: Parameters<typeof plan>) {
              const $result = plan(...args);
              const fieldArgs = args[1];
              const $first = fieldArgs.getRaw("first") as Step | undefined;
              const $last = fieldArgs.getRaw("last") as Step | undefined;
              if ($first === undefined && $last === undefined) return $result;
              if (!isPaginated($result)) {
                throw new Error(`KeytrackPageSizePlugin: ${scope.fieldName} did not plan a paginated step`);
              }
              if (isAbsent($first) && isAbsent($last)) {
                $result.setFirst(constant(defaultPageSize));
              } else {
                $result.setFirst(lambda([$first ?? constant(undefined), $last ?? constant(undefined)], firstOrDefault));
                if (!isAbsent($last)) $result.setLast(lambda($last!, lastChecked));
              }
              return $result;
            },
          };
        },
        GraphQLObjectType_fields_field_args(args, _build, context) {
          if (!wrapped.has(context.scope)) return args;
          const result = { ...args };
          for (const name of ["first", "last"] as const) {
            if (result[name]?.applyPlan) result[name] = { ...result[name], applyPlan: noop };
          }
          return result;
        },
      },
    },
  };
}

/** first/last are applied by the wrapped field plan. */
function noop(): void {}
