// Loads the fleet's web map (`tessera map --server --serve`) in Debian's Chromium
// (headless) with the page's clock fixed, applies each filter step in turn and reports what
// is drawn after it, clicks an identity and reports its details, and saves a screenshot.
//
// node fleet_test.mjs URL SCREENSHOT NOW_MS STEPS_JSON NODE SECRET_FILE
//
// STEPS_JSON: [{"select": "#f-verdict", "value": "allowed"} | {"fill": "#f-search",
// "value": "..."}, ...], each applied alone (the filters reset in between). SECRET_FILE:
// the administrator token, which must appear in no request or response of the page.
import { launch } from "./browser.mjs";
import { readFileSync } from "node:fs";

const [url, screenshot, nowMs, stepsJson, nodeName, secretFile] = process.argv.slice(2);
const steps = JSON.parse(stepsJson);
const secret = readFileSync(secretFile, "utf8").trim();
const browser = await launch();
try {
  const page = await browser.newPage();
  // The page's "now" for the time window filter: fixed, so that which edges fall in the
  // last 5 minutes does not depend on how long the test took.
  await page.clock.setFixedTime(Number(nowMs));
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => m.type() === "error" && errors.push(`console: ${m.text()}`));
  let secretSeen = [];
  const bodies = [];
  page.on("request", (r) => {
    const headers = JSON.stringify(r.headers());
    if (headers.includes(secret) || r.url().includes(secret)) secretSeen.push(`request ${r.url()}`);
  });
  page.on("response", (r) => bodies.push(r.text().then((t) => t.includes(secret) && secretSeen.push(`response ${r.url()}`)).catch(() => {})));

  await page.goto(url);
  await page.waitForSelector('body[data-ready="true"]', { timeout: 20000 });
  const shown = () =>
    page.evaluate(() => ({
      edges: window.tesseraMap.edges.map((e) => ({
        src: e.src,
        dst: e.dst,
        port: e.port,
        verdict: e.verdict,
        new: Boolean(e.new),
        drawn_new: e.drawn_new,
        first_seen_ms: e.first_seen_ms,
        last_seen_ms: e.last_seen_ms,
      })),
      nodes: window.tesseraMap.nodes,
      graph: { ...document.getElementById("graph").dataset },
      new_count: document.getElementById("new-count").textContent,
      summary: document.getElementById("summary").textContent,
      source: document.getElementById("source").textContent,
    }));
  // Applies an action and waits until the page has drawn again.
  const redraw = async (action) => {
    const before = await page.evaluate(() => window.tesseraLastRender);
    await action();
    await page.waitForFunction((t) => window.tesseraLastRender !== t, before, { timeout: 10000 });
  };
  const reset = async () => {
    for (const s of ["#f-verdict", "#f-label", "#f-window"]) {
      if ((await page.inputValue(s)) !== "") await redraw(() => page.selectOption(s, ""));
    }
    if ((await page.inputValue("#f-search")) !== "") await redraw(() => page.fill("#f-search", ""));
  };
  const all = await shown();
  const results = [];
  for (const step of steps) {
    await reset();
    if (step.select) await redraw(() => page.selectOption(step.select, step.value));
    else await redraw(() => page.fill(step.fill, step.value));
    results.push({ step, ...(await shown()), address: page.url() });
  }
  await reset();

  // Click the identity as the user would: its position on the canvas (again if a poll
  // redrew the map under the click).
  for (let attempt = 1; ; attempt++) {
    await page.waitForFunction(() => performance.now() - (window.tesseraLastRender || 0) > 700, null, {
      timeout: 10000,
    });
    const handle = await page.waitForFunction(
      (name) => {
        const at = window.tesseraNodePosition(name);
        return at && at.pending ? false : { at };
      },
      nodeName,
      { timeout: 10000 },
    );
    const { at } = await handle.jsonValue();
    if (!at) throw new Error(`node ${nodeName} is not drawn`);
    await page.mouse.click(at.x, at.y);
    try {
      await page.waitForFunction(
        (name) => {
          const d = document.getElementById("details");
          return d.dataset.kind === "node" && d.dataset.name === name;
        },
        nodeName,
        { timeout: 3000 },
      );
      break;
    } catch (e) {
      if (attempt === 5) {
        await page.screenshot({ path: screenshot, fullPage: true });
        const state = await page.evaluate(
          ([name, x, y]) => ({
            details: { ...document.getElementById("details").dataset },
            text: document.getElementById("details").textContent,
            at: window.tesseraNodePosition(name),
            element: document.elementFromPoint(x, y)?.outerHTML?.slice(0, 200),
          }),
          [nodeName, at.x, at.y],
        );
        throw new Error(`no details of ${nodeName} after clicking at ${JSON.stringify(at)}: ${JSON.stringify(state)} (${e})`);
      }
    }
  }
  const details = await page.evaluate(() => {
    const d = document.getElementById("details");
    return {
      heading: d.querySelector("h2").textContent,
      text: d.textContent,
      rows: Object.fromEntries(
        [...d.querySelectorAll("table:first-of-type tr")].map((tr) => [tr.cells[0].textContent, tr.cells[1].textContent]),
      ),
      labels: Object.fromEntries(
        [...d.querySelectorAll("table.labels tr")].map((tr) => [tr.cells[0].textContent, tr.cells[1].textContent]),
      ),
      flows: [...d.querySelectorAll("tr[data-flow]")].map((tr) => ({ ...tr.dataset, text: tr.textContent })),
    };
  });
  await page.screenshot({ path: screenshot, fullPage: true });
  await Promise.all(bodies);
  console.log(JSON.stringify({ all, steps: results, details, errors, secret_seen: secretSeen }));
} finally {
  await browser.close();
}
