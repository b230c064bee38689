// The recording path's settings: RECORD_RETRY_ATTEMPTS and RECORD_RETRY_BASE_MS.
import test from "ava";

import { ConfigError, loadConfig } from "../../server/config.js";

test("retry settings default to 3 attempts from 100 ms", (t) => {
  const config = loadConfig({});
  t.is(config.recordRetryAttempts, 3);
  t.is(config.recordRetryBaseMs, 100);
});

test("retry settings are read and bounded", (t) => {
  t.like(loadConfig({ RECORD_RETRY_ATTEMPTS: "20", RECORD_RETRY_BASE_MS: "1" }), { recordRetryAttempts: 20, recordRetryBaseMs: 1 });
  t.throws(() => loadConfig({ RECORD_RETRY_ATTEMPTS: "0" }), { instanceOf: ConfigError, message: 'RECORD_RETRY_ATTEMPTS must be an integer 1..20, got "0"' });
  t.throws(() => loadConfig({ RECORD_RETRY_ATTEMPTS: "21" }), { instanceOf: ConfigError, message: /RECORD_RETRY_ATTEMPTS must be an integer 1\.\.20/ });
  t.throws(() => loadConfig({ RECORD_RETRY_BASE_MS: "60001" }), { instanceOf: ConfigError, message: 'RECORD_RETRY_BASE_MS must be an integer 1..60000, got "60001"' });
  t.throws(() => loadConfig({ RECORD_RETRY_BASE_MS: "1.5" }), { instanceOf: ConfigError, message: /RECORD_RETRY_BASE_MS/ });
});
