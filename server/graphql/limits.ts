/**
 * What one GraphQL request may ask for, checked before it runs:
 *
 * - fields: at most MAX_FIELDS field selections per operation, after fragments
 *   and inline fragments are expanded, each alias counted on its own;
 * - depth: at most graphqlMaxDepth nested selections (root fields are depth 1);
 * - page size: `first`/`last` at most graphqlMaxPageSize (and, like `offset`,
 *   not negative);
 * - cost: an estimate of the work, at most graphqlMaxCost. Every selected field
 *   costs 1 each time it is resolved, and every row of a list costs 1; a
 *   paginated field (one with `first`/`last`) multiplies its rows by its page
 *   size (`first`/`last`, or graphqlDefaultPageSize when neither is given), an
 *   unpaginated list of objects by graphqlMaxPageSize; `offset: n` costs the n
 *   rows it skips; a scan (`totalCount`, and the SQL functions behind root
 *   query fields: the reports) costs SCAN_PAGES × graphqlMaxPageSize each time
 *   it runs. Since every row and every value costs at least 1, one response
 *   carries at most graphqlMaxCost of them.
 *
 * Introspection (`__schema`, `__type` and what is under them) is not counted:
 * graphql-js's own MaxIntrospectionDepthRule bounds it, and it is refused to
 * non-admins unless GRAPHIQL is on (introspectionRefusals).
 *
 * The same analysis runs twice: as a validation rule (cached per query text by
 * grafserv), where values given by variables are unknown and count as little
 * as they could (a lower bound: page size 0, `@include(if: $x)` excluded), and
 * again before execution with the request's variable values, for operations
 * that declare variables (checkOperationLimits), so that a request is refused
 * before it runs whichever way its values are given.
 */
import {
  GraphQLError,
  Kind,
  NoSchemaIntrospectionCustomRule,
  getNamedType,
  getNullableType,
  getOperationAST,
  isCompositeType,
  isListType,
  isObjectType,
  isInterfaceType,
  validate,
  valueFromASTUntyped,
  type ASTNode,
  type DocumentNode,
  type FieldNode,
  type FragmentDefinitionNode,
  type GraphQLCompositeType,
  type GraphQLField,
  type GraphQLSchema,
  type OperationDefinitionNode,
  type SelectionSetNode,
  type ValidationRule,
  type ValueNode,
} from "postgraphile/graphql";
import type {} from "postgraphile/grafserv";
import type {} from "postgraphile/grafast";

/** Field selections one operation may have (aliases and fragment fields each counted). */
export const MAX_FIELDS = 200;
/**
 * What a scan (a `totalCount`, a report function) costs, in pages of
 * graphqlMaxPageSize rows: counting a user's 400k rows took as long as
 * fetching about seven full pages of them, so a scan weighs ten.
 */
export const SCAN_PAGES = 10;

export interface GraphQLLimits {
  defaultPageSize: number;
  maxPageSize: number;
  maxCost: number;
  maxDepth: number;
  /** Defaults to MAX_FIELDS. */
  maxFields?: number;
}

/** Field extension set by the page size plugin (server/graphql/pageSize.ts) on fields that scan. */
export interface KeytrackFieldExtensions {
  scan?: boolean;
}

declare module "graphql" {
  interface GraphQLFieldExtensions<_TSource, _TContext, _TArgs = any> {
    keytrack?: KeytrackFieldExtensions;
  }
}

export const LIMIT_CODES = {
  fields: "TOO_MANY_FIELDS",
  depth: "QUERY_TOO_DEEP",
  pageSize: "PAGE_SIZE_TOO_LARGE",
  negative: "NEGATIVE_PAGE_ARGUMENT",
  cost: "QUERY_TOO_COSTLY",
  introspection: "INTROSPECTION_DISABLED",
} as const;

/** What an operation asks for, as estimated; `fields` stops counting past the budget. */
export interface OperationAnalysis {
  fields: number;
  depth: number;
  cost: number;
  /** Counting stopped: more than the field budget. */
  tooManyFields: boolean;
  pageSizes: Array<{ coordinate: string; arg: "first" | "last"; value: number; node: FieldNode }>;
  /** first/last/offset below zero (PostgreSQL would refuse the LIMIT or OFFSET mid-request). */
  negative: Array<{ coordinate: string; arg: "first" | "last" | "offset"; value: number; node: FieldNode }>;
}

/** A value from variables not known yet (validation): counts as little as it could. */
const UNKNOWN = Symbol("unknown");
type Variables = Record<string, unknown> | null;

function argNode(node: FieldNode, name: string): ValueNode | undefined {
  return node.arguments?.find((a) => a.name.value === name)?.value;
}

/** An argument's value: a literal, a variable's value (or its default), or UNKNOWN during validation. */
function valueOf(
  value: ValueNode | undefined,
  variables: Variables,
  operation: OperationDefinitionNode,
): unknown {
  if (value === undefined) return undefined;
  if (value.kind === Kind.VARIABLE) {
    if (variables === null) return UNKNOWN;
    const name = value.name.value;
    if (variables[name] !== undefined) return variables[name];
    const def = operation.variableDefinitions?.find((d) => d.variable.name.value === name);
    return def?.defaultValue ? valueFromASTUntyped(def.defaultValue) : undefined;
  }
  return valueFromASTUntyped(value, variables ?? undefined);
}

function intOf(value: unknown): number | null | typeof UNKNOWN {
  if (value === UNKNOWN) return UNKNOWN;
  // Anything but an integer is refused by GraphQL's own checks; it fetches nothing.
  return typeof value === "number" && Number.isFinite(value) ? Math.trunc(value) : null;
}

/** @skip/@include: UNKNOWN (a variable during validation) leaves the selection out (lower bound). */
function isIncluded(
  node: { directives?: readonly { name: { value: string }; arguments?: readonly { name: { value: string }; value: ValueNode }[] }[] },
  variables: Variables,
  operation: OperationDefinitionNode,
): boolean {
  for (const d of node.directives ?? []) {
    if (d.name.value !== "skip" && d.name.value !== "include") continue;
    const cond = valueOf(d.arguments?.find((a) => a.name.value === "if")?.value, variables, operation);
    if (cond === UNKNOWN) return false;
    if (d.name.value === "skip" && cond === true) return false;
    if (d.name.value === "include" && cond !== true) return false;
  }
  return true;
}

function isScan(field: GraphQLField<unknown, unknown>): boolean {
  return field.extensions?.keytrack?.scan === true || field.name === "totalCount";
}

class TooManyFields extends Error {}

const MULTIPLIER_CAP = 1e18;

/**
 * Walks one operation with every fragment expanded. Stops counting once the
 * fields pass a budget (ten times the limit), so a small document whose
 * fragments expand exponentially costs no more than that to check.
 */
export function analyzeOperation(
  schema: GraphQLSchema,
  operation: OperationDefinitionNode,
  fragments: (name: string) => FragmentDefinitionNode | undefined,
  limits: GraphQLLimits,
  variables: Variables,
): OperationAnalysis {
  const maxFields = limits.maxFields ?? MAX_FIELDS;
  const budget = maxFields * 10;
  const scanCost = SCAN_PAGES * limits.maxPageSize;
  const result: OperationAnalysis = { fields: 0, depth: 0, cost: 0, tooManyFields: false, pageSizes: [], negative: [] };

  const walk = (
    selectionSet: SelectionSetNode,
    parentType: GraphQLCompositeType,
    multiplier: number,
    depth: number,
    /** The page size of the connection this is the selection of: its nodes/edges lists have that many rows. */
    listSize: number | null,
    visiting: Set<string>,
  ): void => {
    for (const selection of selectionSet.selections) {
      if (!isIncluded(selection, variables, operation)) continue;
      if (selection.kind === Kind.INLINE_FRAGMENT) {
        const type = selection.typeCondition ? schema.getType(selection.typeCondition.name.value) : parentType;
        if (type && isCompositeType(type)) walk(selection.selectionSet, type, multiplier, depth, listSize, visiting);
        continue;
      }
      if (selection.kind === Kind.FRAGMENT_SPREAD) {
        const name = selection.name.value;
        const fragment = fragments(name);
        // A cycle is reported by NoFragmentCyclesRule; here it just ends.
        if (!fragment || visiting.has(name)) continue;
        const type = schema.getType(fragment.typeCondition.name.value);
        if (!type || !isCompositeType(type)) continue;
        visiting.add(name);
        walk(fragment.selectionSet, type, multiplier, depth, listSize, visiting);
        visiting.delete(name);
        continue;
      }
      const name = selection.name.value;
      // Introspection: bounded by graphql-js (MaxIntrospectionDepthRule), gated by role.
      if (name === "__schema" || name === "__type") continue;
      result.fields += 1;
      if (result.fields > budget) throw new TooManyFields();
      result.depth = Math.max(result.depth, depth);
      if (name === "__typename") continue;
      if (!isObjectType(parentType) && !isInterfaceType(parentType)) continue;
      const field = parentType.getFields()[name];
      // Unknown fields are reported by FieldsOnCorrectTypeRule.
      if (!field) continue;

      let cost = multiplier;
      if (isScan(field)) cost += multiplier * scanCost;

      const hasFirst = field.args.some((a) => a.name === "first");
      const hasLast = field.args.some((a) => a.name === "last");
      let pageSize: number | null = null;
      if (hasFirst || hasLast) {
        const sizes: number[] = [];
        let unknown = false;
        for (const arg of ["first", "last"] as const) {
          const v = intOf(valueOf(argNode(selection, arg), variables, operation));
          if (v === UNKNOWN) unknown = true;
          else if (v !== null) {
            if (v < 0) result.negative.push({ coordinate: `${parentType.name}.${name}`, arg, value: v, node: selection });
            if (v > limits.maxPageSize) {
              result.pageSizes.push({ coordinate: `${parentType.name}.${name}`, arg, value: v, node: selection });
            }
            sizes.push(Math.min(Math.max(v, 0), limits.maxPageSize));
          }
        }
        pageSize = unknown ? 0 : sizes.length > 0 ? Math.min(...sizes) : limits.defaultPageSize;
        const offset = intOf(valueOf(argNode(selection, "offset"), variables, operation));
        if (typeof offset === "number" && offset < 0) {
          result.negative.push({ coordinate: `${parentType.name}.${name}`, arg: "offset", value: offset, node: selection });
        } else if (typeof offset === "number") cost += multiplier * offset;
      }
      result.cost += cost;

      const namedType = getNamedType(field.type);
      if (!selection.selectionSet || !isCompositeType(namedType)) continue;
      const isList = isListType(getNullableType(field.type));
      let childMultiplier = multiplier;
      let childListSize: number | null = null;
      if (pageSize !== null) {
        // A simple collection is the list itself; a connection passes its page size to nodes/edges.
        if (isList) childMultiplier = multiplier * pageSize;
        else childListSize = pageSize;
      } else if (isList) {
        childMultiplier = multiplier * (listSize ?? limits.maxPageSize);
      }
      // Far past any limit already; kept finite so that a page of 0 below it stays 0 (not NaN).
      childMultiplier = Math.min(childMultiplier, MULTIPLIER_CAP);
      // Each row (list element) costs 1 itself, whatever is selected on it.
      if (isList) result.cost += childMultiplier;
      walk(selection.selectionSet, namedType, childMultiplier, depth + 1, childListSize, visiting);
    }
  };

  const rootType = schema.getRootType(operation.operation);
  if (!rootType) return result;
  try {
    walk(operation.selectionSet, rootType, 1, 1, null, new Set());
  } catch (err) {
    if (!(err instanceof TooManyFields)) throw err;
    result.tooManyFields = true;
  }
  return result;
}

function formatCount(n: number): string {
  return n > 1e15 ? "more than 10^15" : String(n);
}

/** The errors an analysis yields, each naming the limit, its setting and the computed value. */
export function limitErrors(
  analysis: OperationAnalysis,
  limits: GraphQLLimits,
  operation: OperationDefinitionNode,
): GraphQLError[] {
  const maxFields = limits.maxFields ?? MAX_FIELDS;
  const what = operation.name ? `Operation "${operation.name.value}"` : "The operation";
  const nodes: ASTNode[] = [operation];
  if (analysis.tooManyFields || analysis.fields > maxFields) {
    const value = analysis.tooManyFields ? `more than ${maxFields * 10}` : String(analysis.fields);
    return [
      new GraphQLError(
        `${what} selects ${value} fields; the limit is ${maxFields} (aliases and the fields of fragments each count).`,
        { nodes, extensions: { code: LIMIT_CODES.fields, limit: maxFields, value: analysis.tooManyFields ? null : analysis.fields } },
      ),
    ];
  }
  const errors: GraphQLError[] = [];
  if (analysis.depth > limits.maxDepth) {
    errors.push(
      new GraphQLError(`${what} is ${analysis.depth} levels deep; the limit is ${limits.maxDepth} (GRAPHQL_MAX_DEPTH).`, {
        nodes,
        extensions: { code: LIMIT_CODES.depth, limit: limits.maxDepth, value: analysis.depth },
      }),
    );
  }
  for (const p of analysis.negative) {
    errors.push(
      new GraphQLError(`${p.coordinate}(${p.arg}: ${p.value}) must not be negative.`, {
        nodes: [p.node],
        extensions: { code: LIMIT_CODES.negative, limit: 0, value: p.value },
      }),
    );
  }
  for (const p of analysis.pageSizes) {
    errors.push(
      new GraphQLError(
        `${p.coordinate}(${p.arg}: ${p.value}) asks for more than the largest page, ${limits.maxPageSize} rows (GRAPHQL_MAX_PAGE_SIZE); fetch further pages with after/before.`,
        { nodes: [p.node], extensions: { code: LIMIT_CODES.pageSize, limit: limits.maxPageSize, value: p.value } },
      ),
    );
  }
  if (analysis.cost > limits.maxCost) {
    errors.push(
      new GraphQLError(
        `${what} has an estimated cost of ${formatCount(analysis.cost)}; the limit is ${limits.maxCost} (GRAPHQL_MAX_COST). ` +
          `Each row and each field counts once per row it is read for: a connection multiplies its rows by its page size ` +
          `(first/last, or ${limits.defaultPageSize} when neither is given), totalCount and the reports count ${SCAN_PAGES * limits.maxPageSize} each. ` +
          `Ask for smaller pages, fewer nested connections or fewer fields.`,
        { nodes, extensions: { code: LIMIT_CODES.cost, limit: limits.maxCost, value: Number.isFinite(analysis.cost) && analysis.cost <= 1e15 ? analysis.cost : null } },
      ),
    );
  }
  return errors;
}

/** The validation rule: every operation of the document, values from variables counting as little as they could. */
export function makeLimitsRule(limits: GraphQLLimits): ValidationRule {
  return (context) => ({
    OperationDefinition(operation) {
      // graphql-js 16 leaves this to execution, which fails with an internal (masked) error.
      if (operation.operation === "subscription" && !context.getSchema().getSubscriptionType()) {
        context.reportError(new GraphQLError("This API has no subscriptions.", { nodes: [operation], extensions: { code: "SUBSCRIPTIONS_NOT_SUPPORTED" } }));
        return;
      }
      const analysis = analyzeOperation(context.getSchema(), operation, (n) => context.getFragment(n) ?? undefined, limits, null);
      for (const error of limitErrors(analysis, limits, operation)) context.reportError(error);
    },
  });
}

/**
 * The same checks with the request's variable values, before execution: only
 * needed when the operation declares variables (otherwise validation saw it all).
 */
export function checkOperationLimits(
  schema: GraphQLSchema,
  document: DocumentNode,
  operationName: string | null | undefined,
  variables: Record<string, unknown> | null | undefined,
  limits: GraphQLLimits,
): GraphQLError[] {
  const operation = getOperationAST(document, operationName);
  if (!operation || !operation.variableDefinitions?.length) return [];
  const fragments = new Map<string, FragmentDefinitionNode>();
  for (const def of document.definitions) {
    if (def.kind === Kind.FRAGMENT_DEFINITION) fragments.set(def.name.value, def);
  }
  const analysis = analyzeOperation(schema, operation, (n) => fragments.get(n), limits, variables ?? {});
  return limitErrors(analysis, limits, operation);
}

const introspectionErrors = new WeakMap<DocumentNode, readonly GraphQLError[]>();

/**
 * The document's introspection fields (`__schema`, `__type`, in any fragment),
 * as refusals: graphql's NoSchemaIntrospectionCustomRule, cached per parsed
 * document (grafserv hands the same document object back for the same text).
 */
export function introspectionRefusals(schema: GraphQLSchema, document: DocumentNode): readonly GraphQLError[] {
  let errors = introspectionErrors.get(document);
  if (errors === undefined) {
    const found = validate(schema, document, [NoSchemaIntrospectionCustomRule]);
    // The rule names every field of an introspection type; the entry points (__schema, __type) say it all.
    const entries = found.filter((e) => e.nodes?.some((n) => n.kind === Kind.FIELD && (n.name.value === "__schema" || n.name.value === "__type")));
    errors = (entries.length > 0 ? entries : found.slice(0, 1)).map(
      (e) =>
        new GraphQLError(`${e.message} Introspection is for admins (or everyone with GRAPHIQL=true).`, {
          nodes: e.nodes,
          extensions: { code: LIMIT_CODES.introspection },
        }),
    );
    introspectionErrors.set(document, errors);
  }
  return errors;
}

declare global {
  // eslint-disable-next-line @typescript-eslint/no-namespace
  namespace GraphileConfig {
    interface Plugins {
      KeytrackLimitsPlugin: true;
    }
  }
}

export interface LimitsPluginOptions {
  limits: GraphQLLimits;
  /** Whether the request with this GraphQL context (built by then: its pgSettings are there) may introspect the schema. */
  allowIntrospection(contextValue: unknown): boolean;
}

/**
 * Wires the checks into PostGraphile: the validation rule joins grafserv's
 * validation rules (grafserv's setPreset middleware hands over the list to
 * extend; validation results are cached per query text), and a grafast
 * execute middleware refuses, before anything runs, introspection the caller
 * may not do and operations whose variables take them over a limit.
 * Refusals are GraphQL errors without data: HTTP 400, or 200 for clients that
 * only accept application/json (GraphQL over HTTP's legacy rule).
 */
export function makeLimitsPlugin({ limits, allowIntrospection }: LimitsPluginOptions): GraphileConfig.Plugin {
  const rule = makeLimitsRule(limits);
  return {
    name: "KeytrackLimitsPlugin",
    version: "1.0.0",
    description: "Cost, depth, field and page size limits for every GraphQL request; introspection for admins",
    grafserv: {
      middleware: {
        setPreset(next, event) {
          event.validationRules.push(rule);
          return next();
        },
      },
    },
    grafast: {
      middleware: {
        execute(next, event) {
          const { schema, document, operationName, variableValues, contextValue } = event.args;
          if (!allowIntrospection(contextValue)) {
            const refusals = introspectionRefusals(schema, document);
            if (refusals.length > 0) return { errors: [...refusals] };
          }
          const errors = checkOperationLimits(schema, document, operationName, variableValues, limits);
          if (errors.length > 0) return { errors };
          return next();
        },
      },
    },
  };
}
