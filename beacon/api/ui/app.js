// Beacon dashboard. Plain JavaScript, no build step, no third-party code.
//
// Data, all from the public API (paths relative to /ui/, so the page also
// works behind a reverse proxy that mounts the API under a prefix):
//   ../v1/watch        SSE: a "snapshot" event with every service, then "change"
//                      events with the changed services and removed names
//   ../v1/routes       the proxy's routing table and its conflicts
//   ../healthz         Docker connection
//   ../v1/nodes        the nodes (several with a shared store) and the store connection
//   ../v1/traffic      requests, 5xx and p99 per service over the last ~10 s,
//                      computed by the server from the proxy's counters (not
//                      all of /metrics: megabytes at thousands of services)
//   history.json       recent endpoint state changes (kept by the server)
//
// Everything shown comes from outside (container names, check output): it is
// only ever inserted as text, never as HTML.
"use strict";

(() => {
  const API = new URL("../", location.href);
  const url = (path) => new URL(path, API).toString();
  const TRAFFIC_EVERY = 2000; // ms
  const HEALTH_EVERY = 5000; // ms
  const MAX_ENDPOINTS_SHOWN = 100; // per service
  const MAX_HISTORY_SHOWN = 60;

  const state = {
    index: 0,
    services: new Map(), // name -> service JSON (with endpoints)
    routes: { routes: [], conflicts: [] },
    history: [],
    docker: null, // {status, docker} from /healthz, or null when unknown
    nodes: null, // the body of /v1/nodes, or null when unknown
    live: "connecting",
    traffic: null, // the body of /v1/traffic, or null before the first answer
  };

  // ------------------------------------------------------------------ DOM
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else node.setAttribute(key, String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const $ = (id) => document.getElementById(id);
  const cell = (label, attrs, ...children) => el("td", { "data-label": label, ...attrs }, ...children);
  const stateBadge = (s) => el("span", { class: `state ${s}` }, s);
  // A check's output can be a whole error page: show the start, the rest on hover.
  const REASON_SHOWN = 160;
  const short = (text) => (text.length > REASON_SHOWN ? `${text.slice(0, REASON_SHOWN)}…` : text);
  const reasonCell = (text) => cell("reason", { class: "reason", title: text.length > REASON_SHOWN ? text : null }, short(text));
  const time = (seconds) => new Date(seconds * 1000).toLocaleTimeString();

  // Why an endpoint is in its state (mirrors beacon.api.ui.endpoint_reason).
  function reasonOf(e) {
    if (e.reason) return e.reason;
    const cs = e.check_status;
    if (cs && cs.state !== "passing") return cs.output || `check ${cs.state}`;
    if (e.state === "draining") return "stopping: no new requests, in-flight ones finish";
    if (e.state === "critical" && e.check && !cs) return "waiting for the first check to pass";
    if (cs) return cs.output || "";
    return "";
  }

  // --------------------------------------------------------------- traffic
  // Rate, error ratio and p99 of one service over the server's window. A
  // service it does not list had no request in the window; null: no window yet.
  function serviceStats(name) {
    const t = state.traffic;
    if (!t || !(t.window_seconds > 0)) return null;
    const row = t.services[name];
    if (!row) return { rate: 0, errorRatio: 0, p99: null };
    const col = (field) => row[t.fields.indexOf(field)];
    const requests = col("requests");
    return {
      rate: requests / t.window_seconds,
      errorRatio: requests > 0 ? col("errors") / requests : 0,
      p99: col("p99_seconds") ?? null,
    };
  }

  const fmtRate = (r) => (r >= 100 ? r.toFixed(0) : r >= 10 ? r.toFixed(1) : r.toFixed(2));
  const fmtSeconds = (s) => (s === null ? "–" : s < 1 ? `${(s * 1000).toFixed(s < 0.01 ? 2 : 0)} ms` : `${s.toFixed(2)} s`);

  async function pollTraffic() {
    try {
      const resp = await fetch(url("v1/traffic"), { cache: "no-store" });
      if (resp.ok) {
        state.traffic = await resp.json();
        scheduleRender();
      }
    } catch (err) {
      /* the API is down: the live indicator says so */
    }
    setTimeout(pollTraffic, TRAFFIC_EVERY);
  }

  // -------------------------------------------------------- other fetches
  async function getJSON(path) {
    const resp = await fetch(url(path), { cache: "no-store" });
    return resp.json(); // /healthz answers JSON with 503 too
  }

  async function pollHealth() {
    const [docker, nodes] = await Promise.allSettled([getJSON("healthz"), getJSON("v1/nodes")]);
    state.docker = docker.status === "fulfilled" ? docker.value : null;
    state.nodes = nodes.status === "fulfilled" && Array.isArray(nodes.value.nodes) ? nodes.value : null;
    scheduleRender();
    setTimeout(pollHealth, HEALTH_EVERY);
  }

  let refreshTimer = null;
  // Routes and history change with the catalog: refetch once per burst of changes.
  function refreshDerived() {
    if (refreshTimer !== null) return;
    refreshTimer = setTimeout(async () => {
      refreshTimer = null;
      try {
        const [routes, history] = await Promise.all([getJSON("v1/routes"), getJSON("ui/history.json")]);
        state.routes = routes;
        state.history = history.transitions || [];
      } catch (err) {
        /* shown as not live */
      }
      scheduleRender();
    }, 200);
  }

  // ----------------------------------------------------------------- watch
  function connect() {
    const source = new EventSource(url("v1/watch"));
    source.addEventListener("open", () => {
      state.live = "live";
      scheduleRender();
    });
    source.addEventListener("error", () => {
      // EventSource reconnects by itself; the next "snapshot" resyncs everything.
      state.live = "reconnecting";
      scheduleRender();
    });
    source.addEventListener("snapshot", (event) => {
      const data = JSON.parse(event.data);
      state.services = new Map(data.services.map((s) => [s.name, s]));
      state.index = data.index;
      state.live = "live";
      refreshDerived();
      scheduleRender();
    });
    source.addEventListener("change", (event) => {
      const data = JSON.parse(event.data);
      for (const s of data.services) state.services.set(s.name, s);
      for (const name of data.removed) state.services.delete(name);
      state.index = data.index;
      refreshDerived();
      scheduleRender();
    });
  }

  // ---------------------------------------------------------------- render
  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      render();
    });
  }

  function health(service) {
    const total = service.endpoints.length;
    const passing = service.endpoints.filter((e) => e.state === "passing").length;
    const kind = passing === 0 ? "down" : passing < total ? "degraded" : "ok";
    return { total, passing, kind };
  }

  function sortedServices() {
    const rank = { down: 0, degraded: 1, ok: 2 };
    return [...state.services.values()].sort(
      (a, b) => rank[health(a).kind] - rank[health(b).kind] || a.name.localeCompare(b.name),
    );
  }

  function renderHeader() {
    const live = $("live");
    live.textContent = { live: "● live", reconnecting: "reconnecting…", connecting: "connecting…" }[state.live];
    live.className = `pill ${state.live === "live" ? "ok" : "bad"}`;
    live.dataset.live = state.live;
    const docker = $("docker");
    const d = state.docker && state.docker.docker;
    docker.textContent = d ? `Docker ${d}` : "Docker unknown";
    docker.className = `pill ${d === "connected" ? "ok" : d === "disabled" ? "" : "bad"}`;
    $("index").textContent = state.index ? `index ${state.index}` : "";
  }

  function renderSummary(services, problems) {
    const endpoints = services.flatMap((s) => s.endpoints);
    const passing = endpoints.filter((e) => e.state === "passing").length;
    const down = services.filter((s) => health(s).kind === "down").length;
    const nodes = new Set(endpoints.map((e) => e.node || "?"));
    const tile = (label, value, bad) =>
      el("div", { class: `tile${bad ? " bad" : ""}` }, el("div", { class: "value" }, value), el("div", { class: "label" }, label));
    $("summary").replaceChildren(
      tile("services", services.length),
      tile("services down", down, down > 0),
      tile("endpoints passing", `${passing}/${endpoints.length}`, passing < endpoints.length),
      tile("problems", problems.length, problems.length > 0),
      tile("route conflicts", state.routes.conflicts.length, state.routes.conflicts.length > 0),
      tile("nodes", nodes.size),
    );
  }

  function collectProblems(services) {
    const problems = [];
    const d = state.docker && state.docker.docker;
    if (d === "disconnected") problems.push({ kind: "critical", text: "Docker engine disconnected: containers are not being watched" });
    const store = state.nodes && state.nodes.store;
    if (store && !store.connected) problems.push({ kind: "critical", text: "shared store disconnected: other nodes' changes are not seen" });
    for (const n of (state.nodes && state.nodes.nodes) || []) {
      if (n.lease === "expired") problems.push({ kind: "warning", text: `node ${n.node}: lease expired (its endpoints left the catalog)` });
    }
    for (const s of services) {
      const h = health(s);
      if (h.kind === "down") problems.push({ kind: "critical", text: `service ${s.name}: no passing endpoint (0/${h.total})`, service: s.name });
      for (const e of s.endpoints) {
        if (e.state === "passing") continue;
        const reason = reasonOf(e);
        const who = e.source && e.source.container_name ? ` (${e.source.container_name})` : "";
        problems.push({
          kind: e.state,
          text: `${s.name} ${e.id}${who} ${e.address}:${e.port} is ${e.state}${reason ? `: ${short(reason)}` : ""}`,
          endpoint: e.id,
        });
      }
    }
    for (const c of state.routes.conflicts) {
      problems.push({
        kind: "warning",
        text: `route conflict: ${c.host}${c.path_prefix} goes to ${c.winner}; ignored: ${c.losers.join(", ")} (${c.kind})`,
      });
    }
    return problems;
  }

  function renderProblems(problems) {
    const box = $("problems");
    if (!problems.length) {
      box.replaceChildren(el("div", { class: "allgood" }, "✓ No problems: every endpoint is passing"));
      return;
    }
    box.replaceChildren(
      ...problems.map((p) => el("div", { class: `problem ${p.kind}`, "data-problem": p.endpoint || p.service || "" }, p.text)),
    );
  }

  function renderService(s) {
    const h = health(s);
    const stats = serviceStats(s.name);
    const statsBox = el(
      "span",
      { class: "stats" },
      el("span", { title: "requests per second through the proxy" }, stats ? `${fmtRate(stats.rate)} req/s` : "– req/s"),
      el(
        "span",
        { class: stats && stats.errorRatio > 0.01 ? "bad" : "", title: "share of 5xx responses" },
        stats ? `${(stats.errorRatio * 100).toFixed(1)}% 5xx` : "– 5xx",
      ),
      el("span", { title: "99th percentile of request duration" }, `p99 ${fmtSeconds(stats ? stats.p99 : null)}`),
    );
    const head = el(
      "div",
      { class: "svc-head" },
      el("span", { class: "svc-name" }, s.name),
      el("span", { class: "svc-count", title: "passing / total endpoints" }, `${h.passing}/${h.total} passing`),
      el("span", {}, s.tags.map((t) => el("span", { class: "tag" }, t))),
      statsBox,
    );
    const shown = s.endpoints.slice(0, MAX_ENDPOINTS_SHOWN);
    const rows = shown.map((e) => {
      const cs = e.check_status;
      return el(
        "tr",
        { "data-endpoint": e.id, "data-state": e.state },
        cell("state", {}, stateBadge(e.state)),
        cell("endpoint", {}, el("code", {}, e.id)),
        cell("address", {}, el("code", {}, `${e.address}:${e.port}`)),
        cell("source", {}, e.source && e.source.container_name ? e.source.container_name : e.source ? e.source.kind : ""),
        cell("node", {}, e.node),
        reasonCell(reasonOf(e)),
        cell("checked", {}, cs && cs.last_checked ? time(cs.last_checked) : e.check ? "not yet" : "no check"),
      );
    });
    const more = s.endpoints.length - shown.length;
    const table = el(
      "table",
      { class: "stack" },
      el("thead", {}, el("tr", {}, ["state", "endpoint", "address", "source", "node", "reason", "checked"].map((t) => el("th", {}, t)))),
      el("tbody", {}, rows),
    );
    return el(
      "div",
      { class: `svc ${h.kind}`, "data-service": s.name, "data-health": h.kind },
      head,
      table,
      more > 0 ? el("p", { class: "muted" }, `… and ${more} more endpoints`) : null,
    );
  }

  function renderRoutes() {
    const conflictKeys = new Set(state.routes.conflicts.map((c) => `${c.host} ${c.path_prefix}`));
    const routes = state.routes.routes;
    if (!routes.length) {
      $("routes").replaceChildren(el("p", { class: "muted" }, "No routes."));
      return;
    }
    const rows = routes.map((r) =>
      el(
        "tr",
        { class: conflictKeys.has(`${r.host} ${r.path_prefix}`) ? "conflict" : "", "data-route": `${r.host}${r.path_prefix}` },
        cell("host", {}, el("code", {}, r.host)),
        cell("path", {}, el("code", {}, r.path_prefix)),
        cell("service", {}, r.service),
        cell("notes", {}, [r.strip_prefix ? "strips prefix" : "", r.implicit ? "implicit" : "label"].filter(Boolean).join(", ")),
      ),
    );
    const conflicts = state.routes.conflicts.map((c) =>
      el("div", { class: "problem warning" }, `${c.host}${c.path_prefix}: ${c.winner} wins; ignored ${c.losers.join(", ")} (${c.kind})`),
    );
    $("routes").replaceChildren(
      el(
        "div",
        { class: "card" },
        el(
          "table",
          { class: "stack" },
          el("thead", {}, el("tr", {}, ["host", "path", "service", "notes"].map((t) => el("th", {}, t)))),
          el("tbody", {}, rows),
        ),
      ),
      ...conflicts,
    );
  }

  function renderNodes(services) {
    // Every node /v1/nodes knows, plus any node an endpoint names.
    const nodes = new Map();
    const entry = (name) => {
      let n = nodes.get(name);
      if (!n) nodes.set(name, (n = { passing: 0, total: 0, lease: "" }));
      return n;
    };
    for (const info of (state.nodes && state.nodes.nodes) || []) entry(info.node).lease = info.lease;
    for (const s of services) {
      for (const e of s.endpoints) {
        const n = entry(e.node || "?");
        n.total += 1;
        if (e.state === "passing") n.passing += 1;
      }
    }
    if (!nodes.size) {
      $("nodes").replaceChildren(el("p", { class: "muted" }, "No nodes yet."));
      return;
    }
    const rows = [...nodes.entries()]
      .sort((a, b) => a[0].localeCompare(b[0]))
      .map(([name, n]) =>
        el(
          "tr",
          { "data-node": name, "data-state": n.lease === "expired" || n.passing < n.total ? "warning" : "passing" },
          cell("node", {}, name),
          cell("lease", {}, n.lease || "–"),
          cell("endpoints", {}, `${n.passing}/${n.total} passing`),
        ),
      );
    const store = state.nodes && state.nodes.store;
    $("nodes").replaceChildren(
      el(
        "div",
        { class: "card" },
        el(
          "table",
          { class: "stack" },
          el("thead", {}, el("tr", {}, ["node", "lease", "endpoints"].map((h) => el("th", {}, h)))),
          el("tbody", {}, rows),
        ),
      ),
      store
        ? el("p", { class: store.connected ? "muted" : "problem" }, `shared store ${store.connected ? "connected" : "disconnected"}`)
        : null,
    );
  }

  function renderHistory() {
    const items = state.history.slice(0, MAX_HISTORY_SHOWN);
    if (!items.length) {
      $("history").replaceChildren(el("p", { class: "muted" }, "No changes since Beacon started."));
      return;
    }
    const rows = items.map((t) =>
      el(
        "tr",
        { "data-state": t.after || "gone", "data-history": t.endpoint },
        cell("time", {}, time(t.at)),
        cell("service", {}, t.service),
        cell("endpoint", {}, el("code", {}, t.endpoint)),
        cell("change", {}, t.before ? stateBadge(t.before) : "new", " → ", t.after ? stateBadge(t.after) : el("span", { class: "state gone" }, "removed")),
        reasonCell(t.reason),
      ),
    );
    $("history").replaceChildren(
      el(
        "div",
        { class: "card" },
        el(
          "table",
          { class: "stack" },
          el("thead", {}, el("tr", {}, ["time", "service", "endpoint", "change", "reason"].map((h) => el("th", {}, h)))),
          el("tbody", {}, rows),
        ),
      ),
    );
  }

  function render() {
    const services = sortedServices();
    const problems = collectProblems(services);
    renderHeader();
    renderSummary(services, problems);
    renderProblems(problems);
    $("services").replaceChildren(
      ...(services.length ? services.map(renderService) : [el("p", { class: "muted" }, "No services registered.")]),
    );
    renderRoutes();
    renderNodes(services);
    renderHistory();
    document.title = problems.length ? `(${problems.length}) Beacon` : "Beacon";
  }

  connect();
  pollTraffic();
  pollHealth();
  render();
})();
