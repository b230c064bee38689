// The GraphQL schema as SDL, read from a running service by introspection (what
// clients see), sorted so the committed file changes only when the API does.
import { buildClientSchema, getIntrospectionQuery, lexicographicSortSchema, printSchema } from "postgraphile/graphql";

export async function fetchSdl(baseUrl: string): Promise<string> {
  const res = await fetch(`${baseUrl}/graphql`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ query: getIntrospectionQuery({ descriptions: true }) }),
  });
  const body = (await res.json()) as { data?: unknown; errors?: unknown };
  if (!res.ok || !body.data) throw new Error(`introspection failed (${res.status}): ${JSON.stringify(body.errors)}`);
  return printSchema(lexicographicSortSchema(buildClientSchema(body.data as never))) + "\n";
}
