// Drives the `wsgate demo` page in headless Chromium, as a person would: log in, publish from the
// form and see the notification rendered, chat between two users, and check that a page on a
// foreign origin cannot open a socket with the visitor's session cookie.
//
// Run by tests/browser.rs with DEMO_URL (the page the demo printed) and GATEWAY_PORT (the
// gateway's public port). Prints one JSON line of measurements; exits non-zero on any failure.
import http from "node:http";
import { chromium } from "playwright-core";

const demoUrl = process.env.DEMO_URL;
const gatewayPort = process.env.GATEWAY_PORT;
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
if (!demoUrl || !gatewayPort) {
  console.error("DEMO_URL and GATEWAY_PORT must be set");
  process.exit(2);
}
const timeout = 15000;
const tag = Math.random().toString(36).slice(2, 8);

async function loggedIn(browser, user) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(timeout);
  await page.goto(demoUrl);
  await page.click(`#login-${user}`);
  await page.waitForURL(/\/app$/);
  await page.locator("#notws-status", { hasText: /^open$/ }).waitFor();
  await page.locator("#chat-status", { hasText: /^open$/ }).waitFor();
  return { context, page };
}

// A page on another origin (another port of the same host, so the browser holds the demo's
// session cookie for it) that tries to open the gateway's /notws.
function foreignSite() {
  const html = `<!doctype html><title>foreign</title><script>
    window.result = null;
    const ws = new WebSocket("ws://" + location.hostname + ":${gatewayPort}/notws");
    let opened = false, errored = false;
    ws.onopen = () => { opened = true; };
    ws.onerror = () => { errored = true; };
    ws.onclose = (e) => { window.result = { opened, errored, code: e.code }; };
  </script>`;
  const server = http.createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/html" });
    res.end(html);
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

const browser = await chromium.launch({ executablePath, headless: true, args: ["--no-sandbox"] });
let failed = false;
try {
  const john = await loggedIn(browser, "john");
  const jane = await loggedIn(browser, "jane");

  // Publish from the form to john; it must be rendered live on john's page.
  const title = `Hello from the form ${tag}`;
  await john.page.selectOption("#publish-to", "john");
  await john.page.fill("#publish-title", title);
  await john.page.fill("#publish-message", "sent through the publish API");
  let started = Date.now();
  await john.page.click("#publish-send");
  await john.page.locator("#notifications .title", { hasText: title }).waitFor();
  const publishMs = Date.now() - started;
  // The notification may reach the page before the publish's own answer does.
  await john.page.locator("#publish-result", { hasText: /\b\d{3}\b/ }).waitFor();
  const result = await john.page.textContent("#publish-result");
  if (!/202/.test(result)) throw new Error(`publish answered: ${result}`);
  // The publish API's token stays on the back-end.
  if ((await john.page.content()).includes("demo-token")) throw new Error("the page shows the API token");

  // Chat: john writes, jane's page shows it.
  const line = `hi jane ${tag}`;
  await john.page.fill("#chat-input", line);
  started = Date.now();
  await john.page.click("#chat-send");
  const got = jane.page.locator("#chat-log li", { hasText: line });
  await got.waitFor();
  const chatMs = Date.now() - started;
  const from = await got.locator(".from").textContent();
  if (from !== "john:") throw new Error(`chat line shows sender ${from}`);

  // Everyone in the tenant: both pages render it.
  const broadcast = `For everyone ${tag}`;
  await jane.page.selectOption("#publish-to", "*");
  await jane.page.fill("#publish-title", broadcast);
  await jane.page.click("#publish-send");
  await john.page.locator("#notifications .title", { hasText: broadcast }).waitFor();
  await jane.page.locator("#notifications .title", { hasText: broadcast }).waitFor();

  // A foreign origin, in john's browser (his session cookie rides along): refused.
  const server = await foreignSite();
  const foreignUrl = `http://127.0.0.1:${server.address().port}/`;
  const page = await john.context.newPage();
  await page.goto(foreignUrl);
  await page.waitForFunction(() => window.result !== null, null, { timeout });
  const foreign = await page.evaluate(() => window.result);
  server.close();
  if (foreign.opened || !foreign.errored || foreign.code !== 1006) {
    throw new Error(`foreign origin was not refused: ${JSON.stringify(foreign)}`);
  }

  console.log(JSON.stringify({ publishMs, chatMs, foreignOrigin: foreignUrl, foreign }));
} catch (e) {
  failed = true;
  console.error(`browser test failed: ${e.stack || e}`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
