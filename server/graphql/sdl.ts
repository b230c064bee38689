// The GraphQL schema as SDL, read from a running service by introspection (what
// clients see), sorted so the committed file changes only when the API does.
// Introspection is for admins unless GRAPHIQL is on (the default in development,
// e.g. `npm run graphql:sdl` on the embedded database): pass an admin token
// (ADMIN_API_KEY, or an admin user's key) otherwise.
import { buildClientSchema, getIntrospectionQuery, lexicographicSortSchema, printSchema } from "postgraphile/graphql";

export async function fetchSdl(baseUrl: string, token?: string): Promise<string> {
  const res = await fetch(`${baseUrl}/graphql`, {
    method: "POST",
    headers: { "content-type": "application/json", ...(token ? { authorization: `Bearer ${token}` } : {}) },
    body: JSON.stringify({ query: getIntrospectionQuery({ descriptions: true }) }),
  });
  const body = (await res.json()) as { data?: unknown; errors?: Array<{ extensions?: { code?: unknown } }> };
  if (!res.ok || !body.data) {
    const hint = body.errors?.some((e) => e.extensions?.code === "INTROSPECTION_DISABLED")
      ? " (introspection is for admins: run with GRAPHIQL=true, or pass an admin token)"
      : "";
    throw new Error(`introspection failed (${res.status})${hint}: ${JSON.stringify(body.errors)}`);
  }
  return printSchema(lexicographicSortSchema(buildClientSchema(body.data as never))) + "\n";
}
