// Drives the operator console in Debian's headless chromium with playwright-core.
// Run by tests/console.rs against a live stack; every step is bounded and throws on failure.
//
// Env: ADMIN_URL, ENVOY_URL, CONSOLE_TOKEN, ALICE_TOKEN, BOB_TOKEN, JOULE_TOKEN (bob calling as
// the agent "joule"), SCREENSHOT (path of the PNG to write).
//
// The console has IdP sign-in and the break-glass token both on: the first part signs in with
// the token (break-glass), the last part through the sandbox IdP's page, as bob (a viewer,
// refused a revoke) and as alice (an operator, whose revoke the feed shows under her name).
// Prints one line `RESULT <json>` with the trace ids it saw, for the Rust side to check.

import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`missing env ${k}`);
  return v;
};
const ADMIN = env("ADMIN_URL");
const ENVOY = env("ENVOY_URL");
const ME = "/api/2.0/preview/scim/v2/Me";
const STEP = 15_000;

function log(msg) {
  process.stderr.write(`[console.mjs] ${msg}\n`);
}

async function through(token, agentUa = "copilot-agent/1.0") {
  const headers = { "user-agent": agentUa };
  if (token) headers.authorization = `Bearer ${token}`;
  const resp = await fetch(ENVOY + ME, { headers, signal: AbortSignal.timeout(STEP) });
  const body = await resp.text();
  const trace = resp.headers.get("x-aegis-trace-id");
  if (!trace) throw new Error(`no x-aegis-trace-id (status ${resp.status}): ${body}`);
  return { status: resp.status, trace, body };
}

function expectStatus(r, status, what) {
  if (r.status !== status) throw new Error(`${what}: expected ${status}, got ${r.status}: ${r.body}`);
}

const userDataDir = mkdtempSync(join(tmpdir(), "aegis-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
  viewport: { width: 1600, height: 1100 },
});
const result = {};
let page;
try {
  context.setDefaultTimeout(STEP);
  page = context.pages()[0] || (await context.newPage());
  const consoleErrors = [];
  // Script errors only: a 401 the page provokes on purpose is logged as a failed load.
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) consoleErrors.push(m.text());
  });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));

  const row = (trace) => page.locator(`#feed-rows tr[data-trace="${trace}"]`);
  async function seeRow(trace, decision, reason) {
    const r = row(trace);
    await r.waitFor({ state: "attached" });
    const d = await r.getAttribute("data-decision");
    if (d !== decision) throw new Error(`row ${trace}: decision ${d}, want ${decision}`);
    if (reason !== undefined) {
      const got = (await r.locator("td.reason").textContent()).trim();
      if (got !== reason) throw new Error(`row ${trace}: reason ${got}, want ${reason}`);
    }
    const shown = (await r.locator("td.trace").textContent()).trim();
    if (shown !== trace) throw new Error(`row ${trace}: trace cell shows ${shown}`);
  }

  // --- sign in (a wrong token first) ---
  log("sign in");
  await page.goto(`${ADMIN}/console`);
  await page.fill('input[name="token"]', "definitely-not-the-console-token");
  await page.click("#sign-in");
  await page.locator("#login-message", { hasText: "not right" }).waitFor();
  await page.fill('input[name="token"]', env("CONSOLE_TOKEN"));
  await page.click("#sign-in");
  await page.locator("#feed-state", { hasText: "feed: live" }).waitFor();

  // --- the feed receives rows while requests flow through Envoy ---
  log("feed: allow");
  const allowed = await through(env("ALICE_TOKEN"));
  expectStatus(allowed, 200, "alice through envoy");
  await seeRow(allowed.trace, "ALLOW", "—");
  const user = (await row(allowed.trace).locator("td.user").textContent()).trim();
  if (user !== "alice@example.com") throw new Error(`alice's row shows user ${user}`);
  result.allow_trace = allowed.trace;

  log("feed: deny");
  const denied = await through(null);
  expectStatus(denied, 401, "no token through envoy");
  await seeRow(denied.trace, "DENY", "missing_credentials");
  result.deny_trace = denied.trace;

  // --- verify now ---
  log("verify");
  await page.click("#verify-btn");
  await page.locator("#verify-result .intact").waitFor();
  result.verify_text = (await page.locator("#verify-result").textContent()).trim();

  // --- revoke alice: her next request needs a fresh token ---
  log("revoke");
  const cached = await through(env("ALICE_TOKEN"));
  expectStatus(cached, 200, "alice again (cached)");
  await page.fill("#revoke-user", "alice@example.com");
  await page.click("#revoke-btn");
  await page.locator("#action-result", { hasText: "Revoked cached tokens of alice@example.com" }).waitFor();
  const fresh = await through(env("ALICE_TOKEN"));
  expectStatus(fresh, 200, "alice after revoke");
  await seeRow(fresh.trace, "ALLOW", "—");
  result.after_revoke_trace = fresh.trace;

  // --- block an agent, see it denied, unblock it ---
  log("block agent");
  const joule = env("JOULE_TOKEN");
  expectStatus(await through(joule, "joule/2.0"), 200, "joule before the block");
  await page.fill("#block-agent", "joule");
  await page.click("#block-btn");
  await page.locator('#blocked-list button[data-agent="joule"]').waitFor();
  const blocked = await through(joule, "joule/2.0");
  expectStatus(blocked, 403, "joule while blocked");
  await seeRow(blocked.trace, "DENY", "agent_not_allowed");
  result.blocked_trace = blocked.trace;
  await page.click('#blocked-list button[data-agent="joule"]');
  await page.locator('#blocked-list button[data-agent="joule"]').waitFor({ state: "detached" });
  expectStatus(await through(joule, "joule/2.0"), 200, "joule after the unblock");

  // --- filter by user and by decision ---
  log("filters");
  const bobReq = await through(env("BOB_TOKEN"));
  expectStatus(bobReq, 200, "bob through envoy");
  await seeRow(bobReq.trace, "ALLOW");
  await page.fill("#filter-user", "bob");
  await row(allowed.trace).waitFor({ state: "hidden" });
  if (!(await row(bobReq.trace).isVisible())) throw new Error("bob's row hidden by the bob filter");
  await page.fill("#filter-user", "");
  await page.selectOption("#filter-decision", "DENY");
  await row(allowed.trace).waitFor({ state: "hidden" });
  if (!(await row(denied.trace).isVisible())) throw new Error("deny row hidden by the DENY filter");
  await page.selectOption("#filter-decision", "");
  await row(allowed.trace).waitFor({ state: "visible" });

  // --- health and cache panels ---
  log("health and cache");
  for (const dep of ["redis", "postgres", "idp:dev", "workspace:sandbox"]) {
    await page.locator(`#deps tr[data-name="${dep}"] td.up`).waitFor();
  }
  // The chain head catches up with the newest row in the feed.
  const newest = Number(await row(bobReq.trace).getAttribute("data-seq"));
  await page.waitForFunction(
    (n) => Number(document.getElementById("chain-size").textContent) >= n, newest, { timeout: STEP });
  result.newest_seq = newest;
  const cacheRow = page.locator('#cache tr[data-workspace="sandbox"]');
  await cacheRow.waitFor();
  result.cache_row = (await cacheRow.textContent()).trim();

  // --- checkpoints by replica; nothing runs past a card's edge at 1280 px ---
  log("checkpoints and layout");
  await page.locator(`#replica-checkpoints tr[data-signer="${env("INSTANCE_ID")}"]`).waitFor();
  await page.setViewportSize({ width: 1280, height: 1000 });
  await page.waitForTimeout(300);
  const overflowing = await page.evaluate(() => [...document.querySelectorAll(".card")]
    .filter((c) => c.scrollWidth > c.clientWidth + 1 || c.getBoundingClientRect().right > window.innerWidth)
    .map((c) => c.id));
  if (overflowing.length) throw new Error(`cards run past their edge at 1280 px: ${overflowing.join(", ")}`);
  result.layout_1280 = "ok";

  // Let the flash animation finish so the screenshot is clean.
  await page.waitForTimeout(1300);
  await page.screenshot({ path: env("SCREENSHOT"), fullPage: true });

  if (consoleErrors.length) throw new Error(`page errors: ${consoleErrors.join(" | ")}`);

  // --- sign out ---
  log("sign out");
  await page.click("#logout");
  await page.locator('input[name="token"]').waitFor();

  // --- through the IdP: a viewer is refused an action ---
  async function signInThroughIdp(user) {
    await page.goto(`${ADMIN}/console`);
    await page.click("#sign-in-idp");
    await page.locator("#idp-sign-in").waitFor();
    await page.fill("#username", user);
    await page.click("#idp-sign-in");
    await page.locator("#feed-state", { hasText: "feed: live" }).waitFor();
    const who = (await page.locator("#whoami").textContent()).trim();
    if (!who.startsWith(user)) throw new Error(`signed in as ${user}, the page says ${who}`);
    return who;
  }
  log("idp: viewer");
  result.viewer_whoami = await signInThroughIdp("bob");
  if (await page.locator("#revoke-form").isVisible()) throw new Error("a viewer sees the revoke form");
  if (await page.locator("#verify-btn").isVisible()) throw new Error("a viewer sees verify");
  await page.locator("#read-only").waitFor();
  // The page hides the form; the server refuses the request anyway.
  const tried = await page.evaluate(async () => {
    const csrf = document.querySelector('meta[name="aegis-csrf"]').content;
    const r = await fetch("/console/api/revoke", {
      method: "POST", credentials: "same-origin",
      headers: { "content-type": "application/json", "x-aegis-csrf": csrf },
      body: JSON.stringify({ user: "alice@example.com" }),
    });
    return { status: r.status, body: await r.text() };
  });
  if (tried.status !== 403 || !tried.body.includes("your console role does not allow this")) {
    throw new Error(`a viewer's revoke: ${tried.status} ${tried.body}`);
  }
  result.viewer_revoke = tried;
  await page.screenshot({ path: env("SCREENSHOT").replace(/\.png$/, "-viewer.png"), fullPage: true });
  await page.click("#logout");
  await page.locator("#sign-in-idp").waitFor();

  // --- through the IdP: an operator's revoke, recorded with their name ---
  log("idp: operator");
  result.operator_whoami = await signInThroughIdp("alice");
  await page.fill("#revoke-user", "bob@example.com");
  await page.click("#revoke-btn");
  await page.locator("#action-result", { hasText: "Revoked cached tokens of bob@example.com" }).waitFor();
  const adminRow = page.locator('#feed-rows tr[data-decision="ADMIN"][data-actor="console:alice (operator)"][data-user="bob@example.com"]');
  await adminRow.first().waitFor({ state: "attached" });
  result.operator_revoke_trace = await adminRow.first().getAttribute("data-trace");
  await page.click("#logout");
  await page.locator("#sign-in-idp").waitFor();

  if (consoleErrors.length) throw new Error(`page errors: ${consoleErrors.join(" | ")}`);
  console.log(`RESULT ${JSON.stringify(result)}`);
} catch (e) {
  if (page) {
    try {
      await page.screenshot({ path: env("SCREENSHOT").replace(/\.png$/, "-failure.png"), fullPage: true });
    } catch (_) { /* best effort */ }
  }
  console.error(`[console.mjs] FAILED: ${e && e.stack ? e.stack : e}`);
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
