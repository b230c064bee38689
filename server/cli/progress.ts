// A progress bar on stderr: redrawn in place on a terminal, a line every few
// seconds otherwise (CI logs, pipes).
export class ProgressBar {
  private lastLine = 0;
  constructor(
    private readonly total: number,
    private readonly stream: NodeJS.WriteStream = process.stderr,
    private readonly width = 30,
  ) {}

  update(done: number, detail: string): void {
    const fraction = this.total > 0 ? Math.min(1, done / this.total) : 1;
    const filled = Math.round(fraction * this.width);
    const bar = `[${"#".repeat(filled)}${"-".repeat(this.width - filled)}] ${(fraction * 100).toFixed(1).padStart(5)}% ${done}/${this.total} ${detail}`;
    if (this.stream.isTTY) {
      this.stream.write(`\r${bar}\x1b[K`);
    } else if (Date.now() - this.lastLine > 2000 || done >= this.total) {
      this.lastLine = Date.now();
      this.stream.write(`${bar}\n`);
    }
  }

  done(): void {
    if (this.stream.isTTY) this.stream.write("\n");
  }
}
