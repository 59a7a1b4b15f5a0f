// Tessera's connectivity map: identities as nodes (grouped by a chosen label), flows as
// edges coloured by verdict. Data: GET /api/map (merged with ?peers=...), live updates
// from the flow follow stream, details and recent flows on click.
import cytoscape from "cytoscape";

const COLOURS = {
  allowed: "#2e7d32",
  denied: "#c62828",
  "observed-would-deny": "#ef6c00",
  error: "#757575",
};

const params = new URLSearchParams(location.search);
const peers = params.get("peers") || "";
const state = { map: { nodes: [], edges: [] }, groupBy: params.get("group") || "app" };

const $ = (id) => document.getElementById(id);

function text(tag, content, cls) {
  const el = document.createElement(tag);
  el.textContent = content;
  if (cls) el.className = cls;
  return el;
}

function edgeId(e) {
  return `e|${e.src}|${e.dst}|${e.port}|${e.verdict}`;
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
      data: {
        id: edgeId(e),
        source: `n|${e.src}`,
        target: `n|${e.dst}`,
        label: `:${e.port} ×${e.connections}`,
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
    { selector: ":selected", style: { "border-width": 3, "border-color": "#000", width: 4 } },
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
  cy.elements().remove();
  cy.add(elements(state.map, state.groupBy));
  const leaves = cy.nodes().filter((n) => !n.isParent());
  if (!relayout && placed.size > 0 && leaves.every((n) => placed.has(n.id()))) {
    leaves.forEach((n) => {
      n.position(placed.get(n.id()));
    });
    cy.viewport(view);
  } else {
    layout();
  }
  $("summary").textContent = `${state.map.nodes.length} nodes, ${state.map.edges.length} edges`;
  // The browser test (and curious people) can read what is drawn.
  window.tesseraMap = {
    nodes: cy.nodes('[kind != "group"]').map((n) => n.data("label")),
    edges: cy.edges().map((e) => e.data("edge")),
  };
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

async function load() {
  const q = peers ? `?peers=${encodeURIComponent(peers)}` : "";
  const res = await fetch(`/api/map${q}`);
  if (!res.ok) throw new Error(`/api/map: ${res.status}`);
  state.map = await res.json();
  const keys = new Set();
  for (const n of state.map.nodes) for (const k of Object.keys(n.labels || {})) keys.add(k);
  const select = $("group");
  const current = state.groupBy;
  select.replaceChildren(...[...keys].sort().map((k) => {
    const o = document.createElement("option");
    o.value = k;
    o.textContent = k;
    o.selected = k === current;
    return o;
  }));
  render();
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

async function showNode(n) {
  const d = $("details");
  d.replaceChildren(text("h2", n.name));
  const rows = [["SPIFFE", n.spiffe || "(no identity)"], ["enforcer", n.enforcer || "-"]];
  for (const [k, v] of Object.entries(n.labels || {})) rows.push([k, v]);
  d.append(table(rows));
  if (n.workload) {
    d.append(text("h3", "Recent flows"), flowList(await recentFlows(`&workload=${encodeURIComponent(n.workload)}`)));
  }
}

async function showEdge(e) {
  const d = $("details");
  d.replaceChildren(text("h2", `${e.src} → ${e.dst}:${e.port}`));
  d.append(
    table([
      ["verdict", e.verdict],
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
  if (srcWorkload) {
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
$("group").addEventListener("change", (ev) => {
  state.groupBy = ev.target.value;
  render({ relayout: true });
});

// Live: each new flow may change the map; refetch at most twice a second.
let pending = null;
const follow = new EventSource("/api/flows/follow");
follow.addEventListener("flow", () => {
  if (pending) return;
  pending = setTimeout(() => {
    pending = null;
    load().catch((e) => ($("summary").textContent = String(e)));
  }, 500);
});

load().catch((e) => ($("summary").textContent = String(e)));
