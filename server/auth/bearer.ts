/**
 * The one parser of `Authorization: Bearer <token>` headers, for every route
 * (GraphQL, /v1, /admin/monitoring, /metrics). The scheme is case-insensitive
 * (RFC 7235); the token is printable ASCII without spaces (RFC 6750's b64token
 * and more, since imported keys may use any such characters).
 */
export type BearerHeader =
  /** No Authorization header, or an empty one. */
  | { kind: "none" }
  /** A header that is not `Bearer <token>`. */
  | { kind: "malformed" }
  | { kind: "token"; token: string };

const BEARER = /^Bearer +([\x21-\x7e]+) *$/i;

export function parseBearer(header: string | undefined): BearerHeader {
  if (header === undefined || header.trim() === "") return { kind: "none" };
  const match = BEARER.exec(header);
  return match ? { kind: "token", token: match[1]! } : { kind: "malformed" };
}
