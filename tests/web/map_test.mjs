// Loads an enforcer's web map in Debian's Chromium (headless), reports what is drawn,
// clicks an edge, reports the details shown, saves a screenshot, and reports what is drawn
// with the verdict filter on denied.
//
// node map_test.mjs URL SCREENSHOT EDGE_SRC EDGE_DST [TOKEN_FILE]
//
// With TOKEN_FILE (the API's bearer token), every request carries it.
import { launch } from "./browser.mjs";
import { readFileSync } from "node:fs";

const [url, screenshot, edgeSrc, edgeDst, tokenFile] = process.argv.slice(2);
const extraHTTPHeaders = tokenFile
  ? { Authorization: `Bearer ${readFileSync(tokenFile, "utf8").trim()}` }
  : {};
const browser = await launch({ extraHTTPHeaders });
try {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await page.waitForSelector('body[data-ready="true"]', { timeout: 20000 });
  // Click the middle of the edge as the user would: its position on the canvas. Live
  // updates redraw the map (a new identity lays it out again), so click once it has been
  // quiet for a moment, and again if the click landed on what was there before.
  for (let attempt = 1; ; attempt++) {
    await page.waitForFunction(
      () => performance.now() - (window.tesseraLastRender || 0) > 700,
      null,
      { timeout: 10000 },
    );
    const handle = await page.waitForFunction(
      ([src, dst]) => {
        const at = window.tesseraEdgePosition(src, dst);
        return at && at.pending ? false : { at };
      },
      [edgeSrc, edgeDst],
      { timeout: 10000 },
    );
    const { at } = await handle.jsonValue();
    if (!at) throw new Error(`edge ${edgeSrc} -> ${edgeDst} is not drawn`);
    await page.mouse.click(at.x, at.y);
    await page.waitForFunction(() => document.querySelector("#details h2"), null, { timeout: 5000 });
    const heading = await page.textContent("#details h2");
    if (heading.includes("→") || attempt === 5) break;
  }
  await page.waitForTimeout(500); // recent flows arrive after the click
  const details = await page.textContent("#details");
  const drawn = await page.evaluate(() => window.tesseraMap);
  await page.screenshot({ path: screenshot, fullPage: true });
  // The verdict filter: what is drawn with only denied edges asked for.
  const before = await page.evaluate(() => window.tesseraLastRender);
  await page.selectOption("#f-verdict", "denied");
  await page.waitForFunction((t) => window.tesseraLastRender !== t, before, { timeout: 10000 });
  const deniedOnly = await page.evaluate(() => window.tesseraMap.edges);
  console.log(JSON.stringify({ drawn, details, errors, denied_only: deniedOnly }));
} finally {
  await browser.close();
}
