// Tessera's connectivity map: identities as nodes (grouped by a chosen label), flows as
// edges coloured by verdict, new edges (first seen after a baseline window) marked. Data:
// GET /api/map (merged with ?peers=...). The same page is served by an enforcer (its map,
// live from the flow follow stream) and by `tessera map --server --serve` (the fleet's map,
// polled): GET /api/source says which. Filters (verdict, label, time window, search) narrow
// what is drawn and are kept in the address (shareable); a click shows details: an
// identity's SPIFFE name, labels, enforcers and recent flows, an edge's counts and rules.
import cytoscape from "cytoscape";

const COLOURS = {
  allowed: "#2e7d32",
  denied: "#c62828",
  "observed-would-deny": "#ef6c00",
  error: "#757575",
};

const WINDOWS = { "5m": 5 * 60e3, "1h": 3600e3, "24h": 24 * 3600e3 };
const FLEET_POLL_MS = 5000;
const RECENT_FLOWS = 50;

const params = new URLSearchParams(location.search);
const peers = params.get("peers") || "";
const state = {
  map: { nodes: [], edges: [] },
  source: { kind: "enforcer" },
  groupBy: params.get("group") || "app",
  filters: {
    verdict: params.get("verdict") || "",
    label: params.get("label") || "",
    window: params.get("window") || "",
    q: params.get("q") || "",
  },
  // The baseline window for new edges (null: the source's default).
  newAfter: params.get("new_after"),
  loaded: "",
};

const $ = (id) => document.getElementById(id);

function text(tag, content, cls) {
  const el = document.createElement(tag);
  el.textContent = content;
  if (cls) el.className = cls;
  return el;
}

// How a port reads: ":7000" for TCP (edges without a protocol are TCP), ":53/udp",
// "icmp" (no port).
function portLabel(e) {
  const p = e.protocol || "tcp";
  if (p === "tcp") return `:${e.port}`;
  if (p === "udp") return `:${e.port}/udp`;
  return p;
}

function edgeId(e) {
  return `e|${e.src}|${e.dst}|${e.port}|${e.protocol || "tcp"}|${e.verdict}`;
}

function labelPairs(n) {
  return Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`);
}

function nodeText(n) {
  return [n.name, n.spiffe, n.workload, n.enforcer, ...labelPairs(n)].filter(Boolean).join("\n").toLowerCase();
}

// What the filters leave of a map: edges of the verdict, last seen within the window, with
// an end matching the label and the search; the nodes at their ends (and, when only node
// filters are set, matching nodes without any edge).
function filtered(map, f, now) {
  const byName = new Map(map.nodes.map((n) => [n.name, n]));
  const q = f.q.trim().toLowerCase();
  const eq = f.label.indexOf("=");
  const [lk, lv] = eq < 0 ? [f.label, ""] : [f.label.slice(0, eq), f.label.slice(eq + 1)];
  const nodeOk = (name) => {
    const n = byName.get(name) || { name };
    if (f.label && (n.labels || {})[lk] !== lv) return false;
    return !q || nodeText(n).includes(q);
  };
  const since = WINDOWS[f.window] ? now - WINDOWS[f.window] : -Infinity;
  const nodeFilter = Boolean(f.label || q);
  const edges = map.edges.filter(
    (e) =>
      (!f.verdict || e.verdict === f.verdict) &&
      e.last_seen_ms >= since &&
      (!nodeFilter || nodeOk(e.src) || nodeOk(e.dst)),
  );
  const ends = new Set(edges.flatMap((e) => [e.src, e.dst]));
  const connected = new Set(map.edges.flatMap((e) => [e.src, e.dst]));
  const edgeFilter = Boolean(f.verdict || WINDOWS[f.window]);
  const nodes = map.nodes.filter(
    (n) => ends.has(n.name) || (!connected.has(n.name) && !edgeFilter && nodeOk(n.name)),
  );
  // An edge's end the map has no node for (it should not happen): drawn bare.
  for (const name of ends) if (!byName.has(name)) nodes.push({ name });
  return { nodes, edges };
}

function elements(map, groupBy) {
  const out = [];
  const groups = new Set();
  for (const n of map.nodes) {
    const g = (n.labels || {})[groupBy];
    if (g !== undefined) groups.add(g);
    out.push({
      group: "nodes",
      data: {
        id: `n|${n.name}`,
        label: n.name,
        parent: g !== undefined ? `g|${g}` : undefined,
        kind: n.spiffe ? "identity" : "address",
        node: n,
      },
    });
  }
  for (const g of groups) {
    out.push({ group: "nodes", data: { id: `g|${g}`, label: `${groupBy}=${g}`, kind: "group" } });
  }
  for (const e of map.edges) {
    out.push({
      group: "edges",
      classes: e.new ? "new" : "",
      data: {
        id: edgeId(e),
        source: `n|${e.src}`,
        target: `n|${e.dst}`,
        label: `${e.new ? "NEW " : ""}${portLabel(e)} ×${e.connections}`,
        verdict: e.verdict,
        colour: COLOURS[e.verdict] || COLOURS.error,
        edge: e,
      },
    });
  }
  return out;
}

const cy = cytoscape({
  container: $("graph"),
  wheelSensitivity: 0.3,
  style: [
    {
      selector: "node",
      style: {
        label: "data(label)",
        "font-size": 11,
        "text-valign": "bottom",
        "text-margin-y": 4,
        "background-color": "#1565c0",
        width: 22,
        height: 22,
      },
    },
    { selector: 'node[kind = "address"]', style: { "background-color": "#9e9e9e", shape: "diamond" } },
    {
      selector: 'node[kind = "group"]',
      style: {
        "background-color": "#e3f2fd",
        "background-opacity": 0.6,
        "border-color": "#90caf9",
        "border-width": 1,
        "text-valign": "top",
        "font-weight": "bold",
        shape: "round-rectangle",
      },
    },
    {
      selector: "edge",
      style: {
        label: "data(label)",
        "font-size": 10,
        width: 2,
        "line-color": "data(colour)",
        "target-arrow-color": "data(colour)",
        "target-arrow-shape": "triangle",
        "curve-style": "bezier",
        "text-background-color": "#fff",
        "text-background-opacity": 0.8,
      },
    },
    {
      selector: "edge.new",
      style: { "line-style": "dashed", width: 4, color: "#6a1b9a", "font-weight": "bold" },
    },
    { selector: "node:selected", style: { "border-width": 3, "border-color": "#000" } },
    { selector: "edge:selected", style: { width: 5 } },
  ],
});

function intersects(a, b) {
  return a.x1 < b.x2 && b.x1 < a.x2 && a.y1 < b.y2 && b.y1 < a.y2;
}

// Whether the layout left groups on top of each other, or identities (nearly) on top of
// each other: cose, being randomized, sometimes does with few nodes.
function crowded() {
  const groups = cy.nodes().filter((n) => n.isParent() && n.parent().empty()).map((n) => n.boundingBox());
  for (let i = 0; i < groups.length; i++) {
    for (let j = i + 1; j < groups.length; j++) if (intersects(groups[i], groups[j])) return true;
  }
  const leaves = cy.nodes().filter((n) => !n.isParent()).map((n) => n.position());
  if (leaves.length > 300) return false; // large maps: not worth the quadratic check
  for (let i = 0; i < leaves.length; i++) {
    for (let j = i + 1; j < leaves.length; j++) {
      if (Math.hypot(leaves[i].x - leaves[j].x, leaves[i].y - leaves[j].y) < 40) return true;
    }
  }
  return false;
}

function layout() {
  for (let attempt = 0; attempt < 8; attempt++) {
    cy.layout({
      name: "cose",
      animate: false,
      randomize: true,
      padding: 30,
      nodeRepulsion: 8000,
      nodeOverlap: 20,
      componentSpacing: 80,
    }).run();
    if (!crowded()) return;
  }
  cy.layout({ name: "breadthfirst", directed: true, spacingFactor: 1.5, padding: 30 }).run();
}

function render({ relayout = false } = {}) {
  // A live update redraws the map; identities already on it keep their place (and the
  // view its pan and zoom): only a new node (or a new grouping) lays the map out again.
  const placed = new Map(cy.nodes().filter((n) => !n.isParent()).map((n) => [n.id(), { ...n.position() }]));
  const view = { pan: { ...cy.pan() }, zoom: cy.zoom() };
  const shown = filtered(state.map, state.filters, Date.now());
  cy.elements().remove();
  cy.add(elements(shown, state.groupBy));
  const leaves = cy.nodes().filter((n) => !n.isParent());
  if (!relayout && placed.size > 0 && leaves.every((n) => placed.has(n.id()))) {
    leaves.forEach((n) => {
      n.position(placed.get(n.id()));
    });
    cy.viewport(view);
  } else {
    layout();
  }
  const newCount = cy.edges(".new").length;
  const all = state.map;
  $("summary").textContent =
    shown.edges.length === all.edges.length && shown.nodes.length === all.nodes.length
      ? `${all.nodes.length} nodes, ${all.edges.length} edges`
      : `${shown.nodes.length} of ${all.nodes.length} nodes, ${shown.edges.length} of ${all.edges.length} edges`;
  $("new-count").textContent = String(newCount);
  // The browser test (and curious people) can read what is drawn.
  window.tesseraMap = {
    nodes: cy.nodes('[kind != "group"]').map((n) => n.data("label")),
    edges: cy.edges().map((e) => ({ ...e.data("edge"), drawn_new: e.hasClass("new") })),
  };
  Object.assign($("graph").dataset, {
    nodes: String(shown.nodes.length),
    edges: String(shown.edges.length),
    newEdges: String(newCount),
  });
  window.tesseraLastRender = performance.now();
  document.body.dataset.ready = "true";
}

// Where an edge is on the page (for the browser test's click), in page coordinates.
window.tesseraEdgePosition = (src, dst) => {
  const edge = cy.edges().filter((e) => e.data("edge").src === src && e.data("edge").dst === dst)[0];
  if (!edge) return null;
  // Cytoscape computes an edge's geometry when it first draws it (on an animation
  // frame), so right after a render the midpoint may not be known yet.
  const p = edge.renderedMidpoint();
  if (!p || !Number.isFinite(p.x) || !Number.isFinite(p.y)) return { pending: true };
  const box = document.getElementById("graph").getBoundingClientRect();
  return { x: box.left + p.x, y: box.top + p.y };
};

// Where a node is on the page (for the browser test's click).
window.tesseraNodePosition = (name) => {
  const node = cy.getElementById(`n|${name}`);
  if (!node || node.empty()) return null;
  const p = node.renderedPosition();
  if (!p || !Number.isFinite(p.x) || !Number.isFinite(p.y)) return { pending: true };
  const box = document.getElementById("graph").getBoundingClientRect();
  return { x: box.left + p.x, y: box.top + p.y };
};

function option(value, label, selected) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  o.selected = selected;
  return o;
}

// A select's options, `current` among them even if the map no longer has it.
function fillSelect(select, values, current, any) {
  const all = [...new Set([...values, ...(current ? [current] : [])])].sort();
  select.replaceChildren(
    ...(any ? [option("", any, !current)] : []),
    ...all.map((v) => option(v, v, v === current)),
  );
}

function ensureOption(select, value) {
  if (value && ![...select.options].some((o) => o.value === value)) select.append(option(value, value, false));
  select.value = value;
}

async function loadSource() {
  const res = await fetch("/api/source");
  if (res.ok) state.source = await res.json();
  if (state.newAfter === null) state.newAfter = state.source.new_after || "";
  const s = state.source;
  $("source").textContent = s.kind === "fleet" ? `fleet map (${(s.servers || []).join(", ")})` : "this enforcer";
  document.body.dataset.source = s.kind;
  ensureOption($("f-new"), state.newAfter);
}

async function load() {
  const q = new URLSearchParams();
  if (peers) q.set("peers", peers);
  q.set("new_after", state.newAfter || "");
  const res = await fetch(`/api/map?${q}`);
  if (!res.ok) throw new Error(`/api/map: ${res.status} ${await res.text()}`);
  const text = await res.text();
  // A poll that brings nothing new leaves the page (and the user's view) alone.
  if (text === state.loaded) return;
  state.loaded = text;
  state.map = JSON.parse(text);
  const keys = new Set();
  const pairs = new Set();
  for (const n of state.map.nodes) {
    for (const k of Object.keys(n.labels || {})) keys.add(k);
    for (const p of labelPairs(n)) pairs.add(p);
  }
  fillSelect($("group"), keys, state.groupBy, null);
  fillSelect($("f-label"), pairs, state.filters.label, "any");
  // New options may have changed the header's height, and so where the graph is: cytoscape
  // must know, or clicks land where things were.
  cy.resize();
  render();
}

// The filters in the address, so a view can be shared (nothing is sent anywhere).
function remember() {
  const p = new URLSearchParams(location.search);
  const set = (k, v) => (v ? p.set(k, v) : p.delete(k));
  set("group", state.groupBy);
  for (const [k, v] of Object.entries(state.filters)) set(k, v);
  set("new_after", state.newAfter);
  history.replaceState(null, "", `${location.pathname}?${p}`);
}

function table(rows) {
  const t = document.createElement("table");
  for (const [k, v] of rows) {
    const tr = document.createElement("tr");
    tr.append(text("th", k), text("td", v));
    t.append(tr);
  }
  return t;
}

async function recentFlows(filter) {
  const res = await fetch(`/api/flows?limit=20${filter}`);
  if (!res.ok) return [];
  return res.json();
}

function flowList(flows) {
  const ul = document.createElement("ul");
  ul.className = "flows";
  for (const f of flows.slice().reverse()) {
    const when = new Date(f.start_ms).toISOString().slice(11, 23);
    ul.append(
      text("li", `${when} ${f.direction} ${f.verdict}${f.code ? " (" + f.code + ")" : ""} → ${f.dst.addr} ${f.bytes_sent}/${f.bytes_received} B`, f.verdict),
    );
  }
  return ul;
}

function when(ms) {
  return new Date(ms).toISOString().replace("T", " ").slice(0, 19);
}

// An identity's flows on the map: the edges touching it, most recently seen first.
function recentEdges(n) {
  const touching = state.map.edges
    .filter((e) => e.src === n.name || e.dst === n.name)
    .sort((a, b) => b.last_seen_ms - a.last_seen_ms)
    .slice(0, RECENT_FLOWS);
  const t = document.createElement("table");
  t.className = "recent";
  const head = document.createElement("tr");
  for (const h of ["last seen", "", "peer", "port", "verdict", "conns", ""]) head.append(text("th", h));
  t.append(head);
  for (const e of touching) {
    const out = e.src === n.name;
    const tr = document.createElement("tr");
    Object.assign(tr.dataset, {
      flow: "",
      peer: out ? e.dst : e.src,
      direction: out ? "out" : "in",
      port: String(e.port),
      verdict: e.verdict,
      lastSeen: String(e.last_seen_ms),
      new: String(Boolean(e.new)),
    });
    const seen = text("td", when(e.last_seen_ms).slice(11));
    seen.title = when(e.last_seen_ms);
    tr.append(
      seen,
      text("td", out ? "→" : "←"),
      text("td", out ? e.dst : e.src),
      text("td", portLabel(e)),
      text("td", e.verdict, e.verdict),
      text("td", `×${e.connections}`),
      text("td", e.new ? "NEW" : "", "new-mark"),
    );
    t.append(tr);
  }
  return t;
}

async function showNode(n) {
  const d = $("details");
  d.dataset.kind = "node";
  d.dataset.name = n.name;
  d.replaceChildren(text("h2", n.name));
  const reporters = new Set();
  for (const e of state.map.edges) {
    if (e.src === n.name || e.dst === n.name) for (const r of e.reporters || []) reporters.add(r);
  }
  const rows = [
    ["SPIFFE", n.spiffe || "(no identity)"],
    ["workload", n.workload || "-"],
    ["on enforcer", n.enforcer || "-"],
    ["reported by", [...reporters].sort().join(", ") || "-"],
  ];
  const labels = table(Object.entries(n.labels || {}));
  labels.className = "labels";
  d.append(table(rows), text("h3", "Labels"), labels, text("h3", "Recent flows"), recentEdges(n));
  if (n.workload && state.source.kind === "enforcer") {
    d.append(
      text("h3", "Recent connections (this enforcer)"),
      flowList(await recentFlows(`&workload=${encodeURIComponent(n.workload)}`)),
    );
  }
}

async function showEdge(e) {
  const d = $("details");
  d.dataset.kind = "edge";
  d.dataset.name = edgeId(e);
  const port = portLabel(e);
  d.replaceChildren(text("h2", `${e.src} → ${e.dst}${port.startsWith(":") ? "" : " "}${port}`));
  d.append(
    table([
      ["verdict", e.verdict],
      ["new", e.new ? `yes: first seen after the first ${state.newAfter} of the map` : "no"],
      ["connections", String(e.connections)],
      ["bytes out / back", `${e.bytes_sent} / ${e.bytes_received}`],
      ["rules", (e.rules || []).join(", ") || "(none: default deny)"],
      ["codes", (e.codes || []).join(", ") || "-"],
      ["reason", e.reason || "-"],
      ["seen by", (e.reporters || []).join(", ")],
      ["first / last seen", `${new Date(e.first_seen_ms).toISOString()} / ${new Date(e.last_seen_ms).toISOString()}`],
    ]),
  );
  const srcWorkload = (state.map.nodes.find((n) => n.name === e.src) || {}).workload;
  if (srcWorkload && state.source.kind === "enforcer") {
    const flows = (await recentFlows(`&workload=${encodeURIComponent(srcWorkload)}&verdict=${e.verdict}`))
      .filter((f) => f.dst.addr.endsWith(`:${e.port}`));
    d.append(text("h3", "Recent flows"), flowList(flows));
  }
}

cy.on("tap", "node", (ev) => {
  const n = ev.target.data("node");
  if (n) showNode(n);
});
cy.on("tap", "edge", (ev) => showEdge(ev.target.data("edge")));
const failed = (e) => ($("summary").textContent = String(e));

$("group").addEventListener("change", (ev) => {
  state.groupBy = ev.target.value;
  remember();
  render({ relayout: true });
});
for (const [id, key] of [
  ["f-verdict", "verdict"],
  ["f-label", "label"],
  ["f-window", "window"],
]) {
  ensureOption($(id), state.filters[key]);
  $(id).addEventListener("change", (ev) => {
    state.filters[key] = ev.target.value;
    remember();
    render();
  });
}
$("f-search").value = state.filters.q;
$("f-search").addEventListener("input", (ev) => {
  state.filters.q = ev.target.value;
  remember();
  render();
});
$("f-new").addEventListener("change", (ev) => {
  state.newAfter = ev.target.value;
  remember();
  load().catch(failed);
});

// Live: on an enforcer each new flow may change the map (refetched at most twice a
// second); the fleet's map changes as enforcers report, polled.
function live() {
  if (state.source.kind === "fleet") {
    setInterval(() => load().catch(failed), FLEET_POLL_MS);
    return;
  }
  let pending = null;
  const follow = new EventSource("/api/flows/follow");
  follow.addEventListener("flow", () => {
    if (pending) return;
    pending = setTimeout(() => {
      pending = null;
      load().catch(failed);
    }, 500);
  });
}

loadSource()
  .then(load)
  .then(live)
  .catch(failed);
