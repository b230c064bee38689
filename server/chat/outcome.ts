/** What a served request came to, for its ledger row. */
import type { RequestStatus } from "../recording/types.js";
import type { Usage } from "./usage.js";

export interface Outcome {
  status: RequestStatus;
  usage: Usage | null;
  /** Why it failed (or how it ended early); null when completed. */
  error: string | null;
}

export const completed = (usage: Usage | null): Outcome => ({ status: "completed", usage, error: null });
export const failed = (error: string, usage: Usage | null = null): Outcome => ({ status: "failed", usage, error });
export const partial = (error: string, usage: Usage | null = null): Outcome => ({ status: "partial", usage, error });
