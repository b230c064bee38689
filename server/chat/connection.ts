/**
 * The client's side of one request: notices when the client goes away before
 * the response ended (the response's 'close' without 'finish'), exposes it as
 * an AbortSignal for the upstream call, and writes with backpressure.
 */
import { once } from "node:events";

import type express from "express";

export class ClientGone extends Error {
  constructor() {
    super("the client disconnected");
    this.name = "ClientGone";
  }
}

export class ClientConnection {
  private readonly controller = new AbortController();
  /** Aborted when the client disconnects before the response is complete. */
  readonly signal = this.controller.signal;

  constructor(private readonly res: express.Response) {
    res.once("close", () => {
      if (!res.writableFinished) this.controller.abort(new ClientGone());
    });
  }

  get gone(): boolean {
    return this.signal.aborted;
  }

  /** Starts a server-sent events response and sends its headers now. */
  startStream(status: number, headers: Record<string, string>): void {
    this.res.writeHead(status, headers);
    this.res.flushHeaders();
  }

  /** Writes, waiting for the socket to drain when its buffer is full; throws ClientGone when the client left. */
  async write(data: string | Uint8Array): Promise<void> {
    if (this.gone || this.res.destroyed) throw new ClientGone();
    if (this.res.write(data)) return;
    try {
      await once(this.res, "drain", { signal: this.signal });
    } catch {
      throw new ClientGone();
    }
  }

  end(data?: string | Uint8Array): void {
    if (!this.res.writableEnded) {
      if (data === undefined) this.res.end();
      else this.res.end(data);
    }
  }
}
