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
  /** Made when first asked for (streams): most answers are one write and need none. */
  private controller: AbortController | null = null;
  private goneReason: ClientGone | null = null;
  private listeners: Array<(why: ClientGone) => void> = [];

  constructor(private readonly res: express.Response) {
    res.once("close", () => {
      if (res.writableFinished) return;
      const why = new ClientGone();
      this.goneReason = why;
      this.controller?.abort(why);
      for (const listener of this.listeners.splice(0)) listener(why);
    });
  }

  /** Aborted when the client disconnects before the response is complete. */
  get signal(): AbortSignal {
    if (!this.controller) {
      this.controller = new AbortController();
      if (this.goneReason) this.controller.abort(this.goneReason);
    }
    return this.controller.signal;
  }

  get gone(): boolean {
    return this.goneReason !== null;
  }

  /** Calls `listener` once when the client disconnects before the response is complete; returns its removal. */
  onGone(listener: (why: ClientGone) => void): () => void {
    if (this.goneReason) {
      listener(this.goneReason);
      return () => {};
    }
    this.listeners.push(listener);
    return () => {
      const i = this.listeners.indexOf(listener);
      if (i >= 0) this.listeners.splice(i, 1);
    };
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
