// Debian's Chromium, headless, as both browser tests launch it: a fresh profile, no
// sandbox (root in CI), nothing that talks to the network by itself.
import { chromium } from "playwright-core";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export function launch(extra = {}) {
  return chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "tessera-chromium-")), {
    executablePath: "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1400, height: 900 },
    ...extra,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}
