// The entry point of a command-line tool: runs main when the file is executed
// (not when a test imports it), exits with its code; a bad argument or setting
// (ConfigError) is one line and exit code 2, anything else its stack and 1.
import { ConfigError } from "../config.js";

export function runCli(name: string, moduleUrl: string, main: () => Promise<number>): void {
  if (moduleUrl !== `file://${process.argv[1]}`) return;
  main().then(
    (code) => process.exit(code),
    (err) => {
      console.error(err instanceof ConfigError ? `${name}: ${err.message}` : `${name}: ${err.stack ?? err}`);
      process.exit(err instanceof ConfigError ? 2 : 1);
    },
  );
}
