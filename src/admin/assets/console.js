// aegis operator console. Every value from the server is written with textContent, never
// innerHTML: user names, agents and paths come from requests and may hold markup.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="aegis-csrf"]').content;
  const operator = document.querySelector('meta[name="aegis-operator"]').content;
  const roles = document.querySelector('meta[name="aegis-roles"]').content.split(" ").filter(Boolean);
  const can = (role) => roles.includes(role);
  const $ = (id) => document.getElementById(id);
  const MAX_ROWS = 500;
  let rows = 0;

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  async function post(path, body) {
    const resp = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "application/json", "x-aegis-csrf": csrf },
      body: JSON.stringify(body || {}),
    });
    let data = {};
    try { data = await resp.json(); } catch (_) { /* empty body */ }
    if (resp.status === 401) location.reload();
    if (!resp.ok) throw new Error(data.error || ("HTTP " + resp.status));
    return data;
  }

  // === feed ===

  function matches(tr) {
    const u = $("filter-user").value.trim().toLowerCase();
    const a = $("filter-agent").value.trim().toLowerCase();
    const d = $("filter-decision").value;
    return (!u || tr.dataset.user.toLowerCase().includes(u)) &&
      (!a || tr.dataset.agent.toLowerCase().includes(a)) &&
      (!d || tr.dataset.decision === d);
  }

  function applyFilters() {
    let shown = 0;
    for (const tr of $("feed-rows").children) {
      const ok = matches(tr);
      tr.hidden = !ok;
      if (ok) shown++;
    }
    $("feed-count").textContent = "(" + shown + " shown of " + rows + ")";
  }

  function addRow(d) {
    const tbody = $("feed-rows");
    if (tbody.querySelector('tr[data-seq="' + d.seq + '"]')) return;
    const tr = el("tr", null, "entry fresh");
    tr.dataset.seq = d.seq;
    tr.dataset.trace = d.trace_id;
    tr.dataset.decision = d.decision;
    tr.dataset.reason = d.reason;
    tr.dataset.user = d.user_name || "";
    tr.dataset.agent = d.agent || "";
    tr.dataset.actor = d.actor_chain || "";
    const t = new Date(Math.floor(d.ts_unix_micros / 1000));
    tr.append(
      el("td", d.seq, "seq"),
      el("td", t.toLocaleTimeString([], { hour12: false }) + "." + String(t.getMilliseconds()).padStart(3, "0"), "time"),
      el("td", d.decision, "decision " + d.decision),
      el("td", d.reason || "—", "reason"),
      el("td", d.user_name || "—", "user"),
      el("td", d.agent || "—", "agent"),
      el("td", d.workspace || "—", "workspace"),
      el("td", d.method, "method"),
      el("td", d.path, "path"),
      el("td", d.trace_id, "trace"),
    );
    tr.querySelector(".path").title = d.path;
    if (d.actor_chain) tr.querySelector(".decision").title = "by " + d.actor_chain;
    // Newest on top, in seq order even when the backlog and live rows interleave.
    let before = null;
    for (const other of tbody.children) {
      if (Number(other.dataset.seq) < d.seq) { before = other; break; }
    }
    tbody.insertBefore(tr, before);
    rows++;
    while (tbody.children.length > MAX_ROWS) { tbody.lastElementChild.remove(); rows--; }
    tr.hidden = !matches(tr);
    applyFilters();
  }

  function connect() {
    const es = new EventSource("/console/events");
    es.addEventListener("open", () => setPill($("feed-state"), "feed: live", true));
    es.addEventListener("decision", (ev) => addRow(JSON.parse(ev.data)));
    es.addEventListener("lagged", (ev) => {
      $("action-result").textContent = "The feed fell behind and skipped " + ev.data + " row(s); the chain did not.";
    });
    es.addEventListener("signed_out", () => { es.close(); location.reload(); });
    es.addEventListener("error", () => setPill($("feed-state"), "feed: reconnecting", false));
  }

  // === status ===

  function setPill(e, text, ok) {
    e.textContent = text;
    e.className = "pill " + (ok ? "ok" : "bad");
  }

  function ago(unixSecs) {
    const s = Math.max(0, Math.round(Date.now() / 1000 - unixSecs));
    return s < 60 ? s + "s ago" : Math.round(s / 60) + " min ago";
  }

  function showVerify(v) {
    const dd = $("verify-result");
    dd.textContent = "";
    if (!v) { dd.textContent = "not run yet"; return; }
    const when = new Date(v.at_unix_ms).toLocaleTimeString([], { hour12: false });
    if (v.intact) {
      dd.append(el("span", "intact", "intact"), el("span", " · " + v.rows + " rows in " + v.duration_ms + " ms at " + when, "muted"));
    } else {
      dd.append(el("span", "TAMPERED", "tampered"),
        el("span", " at seq " + v.first_bad_seq + ": " + v.problem + " (" + (v.detail || "") + ")"));
    }
  }

  function render(s) {
    $("instance").textContent = s.instance_id + " · v" + s.version;
    setPill($("ready"), s.ready ? "ready" : "not ready", s.ready);
    const c = s.chain;
    $("chain-id").textContent = c.chain_id;
    $("chain-size").textContent = c.head_size !== null && c.head_size !== undefined ? c.head_size : c.size;
    $("chain-head").textContent = c.head_mac_prefix ? "head " + c.head_mac_prefix + "…" : "";
    $("chain-queue").textContent = c.queue_depth + " queued";
    $("chain-checkpoint").textContent = c.last_checkpoint
      ? c.last_checkpoint.size + " rows, signed " + ago(c.last_checkpoint.ts) : "none yet";
    $("chain-tree").textContent = c.tree
      ? c.tree.size + " leaves, root " + c.tree.root.slice(0, 16) + "…" +
        (c.tree.cosigners ? ", " + c.tree.cosigners + " cosignature(s)" : "") +
        (c.tree.witnessed ? "" : " (not witnessed)")
      : "no signed tree head yet";
    if (!c.verify_running) showVerify(c.last_verify);

    const reps = $("replica-checkpoints");
    reps.textContent = "";
    for (const r of c.replica_checkpoints || []) {
      const tr = el("tr");
      tr.dataset.signer = r.signer;
      tr.append(el("td", r.signer || "(v1, unnamed)"), el("td", r.size + " rows"), el("td", ago(r.ts), "muted"));
      reps.append(tr);
    }

    const deps = $("deps");
    deps.textContent = "";
    for (const d of s.dependencies) {
      const tr = el("tr");
      tr.dataset.name = d.name;
      tr.append(el("td", d.name), el("td", d.up ? "up" : "down", d.up ? "up" : "down"),
        el("td", d.latency_ms === null ? "—" : d.latency_ms.toFixed(1) + " ms"), el("td", d.detail, "muted"));
      deps.append(tr);
    }

    const cache = $("cache");
    cache.textContent = "";
    for (const w of s.cache) {
      const tr = el("tr");
      tr.dataset.workspace = w.workspace;
      tr.append(el("td", w.workspace),
        el("td", w.hit_ratio === null ? "—" : (w.hit_ratio * 100).toFixed(1) + "%"),
        el("td", w.l1_hits), el("td", w.l2_hits), el("td", w.mints), el("td", w.mint_failures),
        el("td", w.mints_last_minute), el("td", w.revocations));
      cache.append(tr);
    }
    $("l1-entries").textContent = s.l1_entries + " token(s) cached in this process (values never shown)";

    const sel = $("revoke-workspace");
    if (sel.options.length === 1) {
      for (const w of s.workspaces) sel.append(new Option(w, w));
    }
    const chips = $("blocked-list");
    chips.textContent = "";
    for (const a of s.blocked_agents) {
      if (!can("operator")) {
        const c = el("span", "blocked: " + a, "chip");
        c.dataset.agent = a;
        chips.append(c);
        continue;
      }
      const b = el("button", "unblock " + a, "chip");
      b.type = "button";
      b.dataset.agent = a;
      b.addEventListener("click", () => act("/console/api/unblock", { agent: a }, "Unblocked " + a + "."));
      chips.append(b);
    }
  }

  async function refresh() {
    try {
      const resp = await fetch("/console/api/status", { credentials: "same-origin" });
      if (resp.status === 401) { location.reload(); return; }
      if (resp.ok) render(await resp.json());
    } catch (_) { setPill($("ready"), "unreachable", false); }
  }

  async function act(path, body, okText) {
    const out = $("action-result");
    try {
      await post(path, body);
      out.textContent = okText;
      out.className = "ok-text";
    } catch (e) {
      out.textContent = "Failed: " + e.message;
      out.className = "tampered";
    }
    refresh();
  }

  // === wiring ===

  // What the role cannot use is hidden; the server refuses it either way.
  for (const e of document.querySelectorAll("[data-needs]")) {
    if (!can(e.dataset.needs)) e.classList.add("hidden");
  }
  if (!can("operator")) $("read-only").classList.remove("hidden");
  $("whoami").textContent = operator + " · " + (roles.filter((r) => r !== "viewer").join("+") || "viewer");

  $("export-btn").addEventListener("click", async () => {
    const out = $("action-result");
    try {
      const data = await post("/console/api/export", { limit: 1000 });
      const blob = new Blob([JSON.stringify(data.rows, null, 1)], { type: "application/json" });
      const a = el("a");
      a.href = URL.createObjectURL(blob);
      a.download = "aegis-rows.json";
      a.click();
      setTimeout(() => URL.revokeObjectURL(a.href), 10000);
      out.textContent = "Exported " + data.rows.length + " rows.";
      out.className = "ok-text";
    } catch (e) {
      out.textContent = "Failed: " + e.message;
      out.className = "tampered";
    }
  });

  $("verify-btn").addEventListener("click", async () => {
    const b = $("verify-btn");
    b.disabled = true;
    $("verify-result").textContent = "verifying…";
    try { showVerify(await post("/console/api/verify")); }
    catch (e) { $("verify-result").textContent = "could not run: " + e.message; }
    b.disabled = false;
  });
  $("revoke-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const user = $("revoke-user").value.trim();
    const ws = $("revoke-workspace").value;
    act("/console/api/revoke", { user: user, workspace: ws || null },
      "Revoked cached tokens of " + user + (ws ? " in " + ws : " in every workspace") + ".");
  });
  $("block-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const agent = $("block-agent").value.trim();
    act("/console/api/block", { agent: agent }, "Blocked " + agent + ".");
  });
  $("logout").addEventListener("click", async () => {
    try { await post("/console/logout"); } catch (_) { /* reload shows the sign-in either way */ }
    location.reload();
  });
  for (const id of ["filter-user", "filter-agent", "filter-decision"]) {
    $(id).addEventListener("input", applyFilters);
  }

  connect();
  refresh();
  setInterval(refresh, 2000);
})();
