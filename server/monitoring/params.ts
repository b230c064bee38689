/** Query parameters of the monitoring endpoints: integers within bounds, with a default. */

export interface IntParam {
  name: string;
  min: number;
  max: number;
  default: number;
}

export type ParsedParam = { ok: true; value: number } | { ok: false; message: string };

/**
 * `undefined` (absent) gives the default; anything but one string of decimal
 * digits within [min, max] is refused (repeated, empty, signed, fractional,
 * out of range).
 */
export function parseIntParam(raw: unknown, param: IntParam): ParsedParam {
  if (raw === undefined) return { ok: true, value: param.default };
  const refusal = { ok: false as const, message: `${param.name} must be an integer between ${param.min} and ${param.max}` };
  if (typeof raw !== "string" || !/^[0-9]{1,9}$/.test(raw)) return refusal;
  const value = Number(raw);
  return value >= param.min && value <= param.max ? { ok: true, value } : refusal;
}
