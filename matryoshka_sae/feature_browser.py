"""The feature browser: one static HTML page that shows what each latent of a dictionary responds to.

`write_feature_browser(stats, folder)` writes

    folder/feature_browser.html        the page: open it from disk, no server, no network
    folder/feature_statistics.json     the same statistics for notebooks (`FeatureStatistics.load`)

The page is plain HTML, CSS and JavaScript with the statistics inlined as a JSON script block, so it
needs nothing beside it. It has an index of latents (sortable, filterable by group, density and
max activation, searchable by the text of their top tokens), a panel per latent (histogram of its
activations, top and random contexts with every token shaded by the latent's activation, logit
effects, parents and children as links) and a hierarchy view (each child under its most likely
parent). Dataset text only ever reaches the page through `textContent` (never parsed as HTML),
and the inlined JSON has `<`, `>` and `&` escaped, so no text can close the script block.

A transcoder set (one dictionary per layer) gets one page per layer and an index page,
`write_set_browser(stats_by_layer, folder)`:

    folder/index.html                               the layers: sizes, dead latents, links
    folder/layer_{i}/feature_browser.html           layer i's page, with a layer selector
    folder/layer_{i}/feature_statistics.json        layer i's statistics
"""

from __future__ import annotations

import json
from pathlib import Path

from matryoshka_sae.feature_statistics import FeatureStatistics

PAGE_FILE = "feature_browser.html"
STATISTICS_FILE = "feature_statistics.json"
SET_INDEX_FILE = "index.html"


def write_feature_browser(
    stats: FeatureStatistics, folder: str | Path, navigation: dict | None = None
) -> Path:
    """Write the page and the statistics' JSON into `folder`; returns the page's path.

    `navigation` (a set's layer pages, see `write_set_browser`): {"index": href of the set's
    index, "current": this page's label, "pages": [[label, href], ...]}, shown as a selector.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stats.save(folder / STATISTICS_FILE)
    page = folder / PAGE_FILE
    page.write_text(render_page(stats.data, navigation), encoding="utf-8")
    return page


def layer_page_folder(layer: int) -> str:
    return f"layer_{layer}"


def write_set_browser(stats_by_layer: dict[int, FeatureStatistics], folder: str | Path) -> Path:
    """One page per layer (``folder/layer_{i}/``, each with a selector of the other layers) and
    the set's index page ``folder/index.html``, whose path is returned."""
    folder = Path(folder)
    layers = sorted(stats_by_layer)
    pages = [[f"layer {layer}", f"../{layer_page_folder(layer)}/{PAGE_FILE}"] for layer in layers]
    for layer in layers:
        navigation = {"index": f"../{SET_INDEX_FILE}", "current": f"layer {layer}", "pages": pages}
        write_feature_browser(stats_by_layer[layer], folder / layer_page_folder(layer), navigation)
    index = folder / SET_INDEX_FILE
    index.write_text(
        render_set_index([set_row(layer, stats_by_layer[layer]) for layer in layers]),
        encoding="utf-8",
    )
    return index


def set_row(layer: int, stats: FeatureStatistics) -> dict:
    """What the set's index says about one layer's dictionary."""
    latents = stats.data["latents"]
    densities = sorted(latent["density"] for latent in latents)
    return {
        "layer": layer,
        "href": f"{layer_page_folder(layer)}/{PAGE_FILE}",
        "source": stats.data["source"],
        "n_latents": len(latents),
        "never_fired": sum(latent["fire_count"] == 0 for latent in latents),
        "median_density": densities[len(densities) // 2] if densities else 0,
        "n_tokens": stats.data["n_tokens"],
    }


def inline_json(data: dict) -> str:
    """JSON safe inside <script type="application/json">: no <, > or & characters left."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def render_page(data: dict, navigation: dict | None = None) -> str:
    page = PAGE_TEMPLATE.replace("/*STYLE*/", STYLE).replace("/*SCRIPT*/", SCRIPT)
    page = page.replace("/*NAVIGATION*/", inline_json(navigation))
    return page.replace("/*DATA*/", inline_json(data))  # last: the data may hold any text


def render_set_index(rows: list[dict]) -> str:
    page = SET_INDEX_TEMPLATE.replace("/*STYLE*/", STYLE).replace("/*SCRIPT*/", SET_INDEX_SCRIPT)
    return page.replace("/*DATA*/", inline_json({"layers": rows}))


PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Feature browser</title>
<style>/*STYLE*/</style>
</head>
<body>
<header>
  <h1>Feature browser</h1>
  <span id="layer-navigation"></span>
  <div id="summary"></div>
  <nav>
    <a href="#latents" id="tab-latents" class="tab">Latents</a>
    <a href="#hierarchy" id="tab-hierarchy" class="tab">Hierarchy</a>
  </nav>
</header>
<main>
  <section id="latents-view" class="view">
    <div id="index-pane">
      <div id="controls">
        <input id="search" type="search" placeholder="search top tokens" size="14">
        <label>group <select id="group-filter"><option value="all">all</option></select></label>
        <label>density &ge; <input id="min-density" type="text" value="0" size="6"></label>
        <label>&le; <input id="max-density" type="text" value="1" size="4"></label>
        <label>max act &ge; <input id="min-max-activation" type="text" value="0" size="4"></label>
      </div>
      <div id="index-note"></div>
      <table id="latent-index">
        <thead><tr>
          <th data-sort="index">latent</th><th data-sort="group">group</th>
          <th data-sort="density">density</th><th data-sort="max_activation">max act</th>
          <th data-sort="mean_activation">mean act</th><th>top tokens</th>
        </tr></thead>
        <tbody></tbody>
      </table>
    </div>
    <div id="latent-panel"></div>
  </section>
  <section id="hierarchy-view" class="view">
    <p id="hierarchy-note"></p>
    <div id="hierarchy-tree"></div>
  </section>
</main>
<script type="application/json" id="set-navigation">/*NAVIGATION*/</script>
<script type="application/json" id="feature-data">/*DATA*/</script>
<script>/*SCRIPT*/</script>
</body>
</html>
"""

SET_INDEX_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Transcoder set: feature browser</title>
<style>/*STYLE*/</style>
</head>
<body>
<header>
  <h1>Transcoder set</h1>
  <label>layer <select id="layer-select"><option value="">choose</option></select></label>
  <div id="summary"></div>
</header>
<main>
  <table id="layer-table">
    <thead><tr><th>layer</th><th>reads &rarr; predicts</th><th>latents</th><th>never fired</th>
      <th>median density</th><th>held-out tokens</th></tr></thead>
    <tbody></tbody>
  </table>
</main>
<script type="application/json" id="set-data">/*DATA*/</script>
<script>/*SCRIPT*/</script>
</body>
</html>
"""

SET_INDEX_SCRIPT = r"""
"use strict";
window.addEventListener("error", function (event) {
  document.documentElement.setAttribute("data-script-error", String(event.message));
});
const SET = JSON.parse(document.getElementById("set-data").textContent);
function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }
const body = document.querySelector("#layer-table tbody"), select = document.getElementById("layer-select");
for (const row of SET.layers) {
  const tr = document.createElement("tr"), link = document.createElement("a"), first = document.createElement("td");
  tr.setAttribute("data-layer", row.layer);
  link.href = row.href; link.textContent = "layer " + row.layer;
  first.append(link);
  const s = row.source;
  tr.append(first, cell(s.source_hook_point ? s.source_hook_point + " \u2192 " + s.target_hook_point : (s.hook_point || "")),
    cell(row.n_latents), cell(row.never_fired), cell((100 * row.median_density).toPrecision(3) + "%"),
    cell(row.n_tokens.toLocaleString("en")));
  body.append(tr);
  const option = document.createElement("option");
  option.value = row.href; option.textContent = "layer " + row.layer;
  select.append(option);
}
select.addEventListener("change", () => { if (select.value) location.href = select.value; });
const first = SET.layers.length ? SET.layers[0].source : {};
document.getElementById("summary").textContent = [first.model_name, first.sae_type,
  SET.layers.length + " layers"].filter(x => x).join(" \u00b7 ");
document.body.setAttribute("data-rendered", "ok");
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; font-size: 14px; }
header { padding: 8px 16px; background: #fff; border-bottom: 1px solid #ddd; }
h1 { font-size: 18px; margin: 0 12px 0 0; display: inline-block; }
#summary { display: inline-block; color: #555; }
#layer-navigation { margin-right: 12px; }
#layer-table { width: auto; background: #fff; }
nav { margin-top: 6px; }
.tab { margin-right: 12px; padding: 3px 10px; border-radius: 4px; text-decoration: none; color: #333; border: 1px solid #ccc; }
.tab.active { background: #333; color: #fff; }
main { padding: 8px 16px; }
.view { display: none; }
.view.active { display: flex; gap: 16px; }
#hierarchy-view.active { display: block; }
#index-pane { flex: 0 0 520px; max-height: calc(100vh - 110px); overflow-y: auto; background: #fff; border: 1px solid #ddd; }
#controls { padding: 6px; position: sticky; top: 0; background: #fff; border-bottom: 1px solid #eee; }
#controls input, #controls select { font-size: 12px; }
#index-note { font-size: 12px; color: #777; padding: 2px 6px; }
table { border-collapse: collapse; width: 100%; font-size: 12px; }
th { cursor: pointer; text-align: left; background: #f0f0f0; position: sticky; top: 0; }
th, td { padding: 2px 6px; border-bottom: 1px solid #eee; white-space: nowrap; }
tbody tr { cursor: pointer; }
tbody tr:hover, tbody tr.selected { background: #fff3e0; }
#latent-panel { flex: 1 1 auto; min-width: 0; background: #fff; border: 1px solid #ddd; padding: 10px 14px;
  max-height: calc(100vh - 110px); overflow-y: auto; }
#latent-panel h2 { margin: 0 0 6px 0; font-size: 18px; }
h3 { font-size: 14px; margin: 12px 0 4px 0; }
.stats span { margin-right: 16px; }
.badge { background: #e3ecfa; border-radius: 3px; padding: 0 5px; font-size: 12px; }
.context { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre; overflow: hidden;
  text-overflow: ellipsis; padding: 1px 0; border-bottom: 1px dotted #eee; }
.context .value { display: inline-block; width: 92px; color: #666; text-align: right; margin-right: 8px; }
.tok { border-radius: 2px; }
.tok.center { outline: 1px solid #c60; }
.chip { font-family: ui-monospace, monospace; background: #f1f1f1; border-radius: 3px; padding: 0 3px;
  margin-right: 3px; white-space: pre; }
.columns { display: flex; gap: 24px; flex-wrap: wrap; }
.half { flex: 1 1 380px; min-width: 0; }
ul.links { margin: 0; padding-left: 18px; font-size: 12px; }
table.logits { width: auto; }
.logits td { font-family: ui-monospace, monospace; white-space: pre; padding: 0 6px; }
.links li { margin: 1px 0; }
a.latent-link { color: #0645ad; cursor: pointer; }
svg .bar { fill: #f0a040; }
svg text { font-size: 10px; fill: #555; }
#hierarchy-tree details { margin-left: 18px; }
#hierarchy-tree summary { cursor: pointer; padding: 1px 0; }
.muted { color: #777; font-size: 12px; }
p.muted { margin: 2px 0 4px 0; }
#script-error { background: #fdd; color: #900; padding: 8px; }
"""

SCRIPT = r"""
"use strict";
window.addEventListener("error", function (event) {
  document.documentElement.setAttribute("data-script-error", String(event.message));
  const box = document.createElement("div");
  box.id = "script-error";
  box.textContent = "Script error: " + event.message;
  document.body.prepend(box);
});

const DATA = JSON.parse(document.getElementById("feature-data").textContent);
const LATENTS = DATA.latents;
const VOCAB = DATA.vocabulary;
const EDGES = DATA.settings.histogram_edges;
const MAX_INDEX_ROWS = 500;
const MAX_ROOTS = 300;
const LINKS_SHOWN = 6;
let sortKey = "index", sortDescending = false;

function el(tag, attributes, children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (key === "text") node.textContent = value; else node.setAttribute(key, value);
  }
  for (const child of children || []) node.append(child);
  return node;
}
function tokenText(id) {
  const text = VOCAB[String(id)];
  return text === undefined ? "[" + id + "]" : text;
}
function shown(text) {
  return text.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192").replace(/\r/g, "");
}
function number(x) {
  if (x === 0) return "0";
  if (Math.abs(x) >= 100 || Math.abs(x) < 0.01) return x.toExponential(1);
  return x.toFixed(2);
}
function percent(x) { return x === 0 ? "0" : (100 * x < 0.01 ? (100 * x).toExponential(1) : (100 * x).toFixed(2)) + "%"; }
function latentLink(i) {
  return el("a", {"class": "latent-link", href: "#latent-" + i, text: "#" + i});
}
function topTokens(latent, count) {
  const seen = [];
  for (const context of latent.top_contexts) {
    const text = tokenText(context.tokens[context.center]);
    if (!seen.includes(text)) seen.push(text);
    if (seen.length === count) break;
  }
  return seen;
}
function chipText(text) {  // runs of spaces (code indentation) as one mark and their count
  return shown(text).replace(/ {3,}/g, run => "\u2423" + run.length);
}
function chips(texts) {
  const span = el("span");
  for (const text of texts) span.append(el("span", {"class": "chip", text: chipText(text)}));
  return span;
}
function groupRange(g) {
  const ends = DATA.group_ends, start = g === 0 ? 0 : ends[g - 1];
  return "latents " + start + "\u2013" + (ends[g] - 1);
}

// ---- a set's layer selector -------------------------------------------------------------------
function renderNavigation() {
  const nav = JSON.parse(document.getElementById("set-navigation").textContent);
  if (!nav) return;
  const select = el("select", {id: "layer-select"});
  for (const [label, href] of nav.pages) {
    const option = el("option", {value: href, text: label});
    if (label === nav.current) option.setAttribute("selected", "");
    select.append(option);
  }
  select.addEventListener("change", () => { location.href = select.value; });
  document.getElementById("layer-navigation").append(el("a", {href: nav.index, text: "all layers"}), " ", select, " ");
}

// ---- summary -------------------------------------------------------------------------------
function renderSummary() {
  const s = DATA.source, parts = [];
  if (s.model_name) parts.push(s.model_name);
  if (s.source_hook_point) parts.push(s.source_hook_point + " \u2192 " + s.target_hook_point);
  else if (s.hook_point) parts.push(s.hook_point);
  if (s.sae_type) parts.push(s.sae_type);
  parts.push(LATENTS.length + " latents" + (DATA.group_ends.length > 1 ? " in groups ending at " + DATA.group_ends.join(", ") : ""));
  parts.push(DATA.n_tokens.toLocaleString("en") + " held-out tokens");
  const dead = LATENTS.filter(l => l.fire_count === 0).length;
  parts.push(dead + " never fired");
  document.getElementById("summary").textContent = parts.join(" \u00b7 ");
}

// ---- index ---------------------------------------------------------------------------------
function readNumber(id, fallback) {
  const value = parseFloat(document.getElementById(id).value);
  return isNaN(value) ? fallback : value;
}
function renderIndex() {
  const query = document.getElementById("search").value.toLowerCase();
  const group = document.getElementById("group-filter").value;
  const minDensity = readNumber("min-density", 0), maxDensity = readNumber("max-density", 1);
  const minMax = readNumber("min-max-activation", 0);
  let rows = LATENTS.filter(l =>
    (group === "all" || l.group === Number(group)) && l.density >= minDensity && l.density <= maxDensity &&
    l.max_activation >= minMax &&
    (query === "" || topTokens(l, 20).some(t => t.toLowerCase().includes(query))));
  rows.sort((a, b) => (a[sortKey] - b[sortKey]) * (sortDescending ? -1 : 1) || a.index - b.index);
  document.getElementById("index-note").textContent = rows.length > MAX_INDEX_ROWS
    ? "showing " + MAX_INDEX_ROWS + " of " + rows.length + " matching latents (filter to narrow)"
    : rows.length + " matching latents";
  const body = document.querySelector("#latent-index tbody");
  body.replaceChildren();
  for (const l of rows.slice(0, MAX_INDEX_ROWS)) {
    const row = el("tr", {"data-latent": l.index}, [
      el("td", {text: "#" + l.index}), el("td", {text: l.group}), el("td", {text: percent(l.density)}),
      el("td", {text: number(l.max_activation)}), el("td", {text: number(l.mean_activation)}),
      el("td", {}, [chips(topTokens(l, 4))])]);
    row.addEventListener("click", () => { location.hash = "latent-" + l.index; });
    body.append(row);
  }
  markSelected();
}
function markSelected() {
  for (const row of document.querySelectorAll("#latent-index tbody tr")) {
    row.classList.toggle("selected", Number(row.getAttribute("data-latent")) === currentLatent);
  }
}
function setUpIndex() {
  const select = document.getElementById("group-filter");
  DATA.group_ends.forEach((_, g) => select.append(el("option", {value: g, text: g + " (" + groupRange(g) + ")"})));
  for (const id of ["search", "group-filter", "min-density", "max-density", "min-max-activation"]) {
    document.getElementById(id).addEventListener("input", renderIndex);
  }
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.addEventListener("click", () => {
      const key = th.getAttribute("data-sort");
      sortDescending = key === sortKey ? !sortDescending : key !== "index" && key !== "group";
      sortKey = key;
      renderIndex();
    });
  }
}

// ---- latent panel --------------------------------------------------------------------------
function histogram(latent) {
  const svgNS = "http://www.w3.org/2000/svg", width = 420, height = 110, bottom = 16;
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  svg.setAttribute("id", "histogram");
  const counts = latent.histogram.counts, first = latent.histogram.first_bin;
  if (counts.length === 0) return el("p", {"class": "muted", text: "never fired"});
  const peak = Math.max(...counts), barWidth = width / counts.length;
  counts.forEach((count, b) => {
    const bar = document.createElementNS(svgNS, "rect"), h = (height - bottom) * count / peak;
    bar.setAttribute("class", "bar");
    bar.setAttribute("x", b * barWidth + 0.5); bar.setAttribute("width", Math.max(barWidth - 1, 1));
    bar.setAttribute("y", height - bottom - h); bar.setAttribute("height", h);
    const title = document.createElementNS(svgNS, "title");
    title.textContent = number(EDGES[first + b]) + "\u2013" + number(EDGES[first + b + 1]) + ": " + count;
    bar.append(title);
    svg.append(bar);
  });
  for (const [x, anchor, value] of [[0, "start", EDGES[first]], [width, "end", EDGES[first + counts.length]]]) {
    const label = document.createElementNS(svgNS, "text");
    label.setAttribute("x", x); label.setAttribute("y", height - 3); label.setAttribute("text-anchor", anchor);
    label.textContent = number(value);
    svg.append(label);
  }
  return svg;
}
function contextLine(context, maxActivation, label) {
  const line = el("div", {"class": "context"}, [el("span", {"class": "value", text: label})]);
  context.tokens.forEach((id, k) => {
    const act = context.activations[k];
    const span = el("span", {"class": k === context.center ? "tok center" : "tok", title: tokenText(id) + " : " + act,
                             text: shown(tokenText(id))});
    if (act > 0) span.style.background = "rgba(240, 120, 0, " + Math.min(1, 0.12 + 0.88 * act / maxActivation).toFixed(3) + ")";
    line.append(span);
  });
  return line;
}
function linkItem(link) {
  const other = LATENTS[link.latent];
  return el("li", {}, [latentLink(link.latent), " ", el("span", {"class": "badge", text: "g" + other.group}), " ",
    el("span", {"class": "muted", text: "P(p|c) " + link.p_parent_given_child.toFixed(2) + " \u00b7 P(c|p) " +
      link.p_child_given_parent.toFixed(2) + " \u00b7 " + link.co_fires + "\u00d7 \u00b7 cos " + link.decoder_cosine.toFixed(2) + " "}),
    chips(topTokens(other, 3))]);
}
function linkList(links, kind) {
  if (links.length === 0) return el("p", {"class": "muted", text: "none"});
  const list = el("ul", {"class": "links " + kind});
  for (const link of links.slice(0, LINKS_SHOWN)) list.append(linkItem(link));
  if (links.length > LINKS_SHOWN) {
    const more = el("details", {}, [el("summary", {"class": "muted", text: (links.length - LINKS_SHOWN) + " more"})]);
    const rest = el("ul", {"class": "links"});
    for (const link of links.slice(LINKS_SHOWN)) rest.append(linkItem(link));
    more.append(rest);
    list.append(el("li", {}, [more]));
  }
  return list;
}
function logitTable(pairs, title) {
  const table = el("table", {"class": "logits"}, [el("tr", {}, [el("th", {text: title}), el("th", {text: "logit"})])]);
  for (const [id, value] of pairs) table.append(el("tr", {}, [el("td", {text: shown(tokenText(id))}), el("td", {text: value.toFixed(3)})]));
  return table;
}
let currentLatent = null;
function renderLatent(i) {
  const latent = LATENTS[i], panel = document.getElementById("latent-panel");
  currentLatent = i;
  panel.replaceChildren();
  const groups = DATA.group_ends.length > 1 ? [" ", el("span", {"class": "badge", text: "group " + latent.group + " (" + groupRange(latent.group) + ")"})] : [];
  panel.append(el("h2", {id: "latent-title"}, ["Latent " + i, ...groups]));
  panel.append(el("div", {"class": "stats"}, [
    el("span", {text: "fires on " + latent.fire_count + " tokens (" + percent(latent.density) + ")"}),
    el("span", {text: "mean activation " + number(latent.mean_activation)}),
    el("span", {text: "max " + number(latent.max_activation)})]));
  const overview = el("div", {"class": "columns"}, [
    el("div", {}, [el("h3", {text: "Activations when firing (log-spaced bins)"}), histogram(latent)])]);
  if (latent.logits_up) {
    overview.append(el("div", {}, [el("h3", {text: "Logit effects (direct path)"}),
      el("div", {"class": "columns"}, [logitTable(latent.logits_up, "raised"), logitTable(latent.logits_down, "lowered")])]));
  }
  panel.append(overview);
  const top = el("div", {id: "top-contexts"});
  for (const context of latent.top_contexts) top.append(contextLine(context, latent.max_activation, number(context.activation)));
  panel.append(el("h3", {text: "Top " + latent.top_contexts.length + " contexts"}), top);
  if (DATA.hierarchy) {
    panel.append(el("h3", {text: "Hierarchy"}), el("p", {"class": "muted", text: "P(p|c): how often the parent " +
      "fires when the child does; P(c|p): the converse; \u00d7: tokens where both fire; cos: decoder cosine."}));
    panel.append(el("div", {"class": "columns"}, [
      el("div", {"class": "half"}, [el("b", {text: "Parents"}), linkList(latent.parents, "parents")]),
      el("div", {"class": "half"}, [el("b", {text: "Children"}), linkList(latent.children, "children")])]));
  }
  const random = el("div", {id: "random-contexts"});
  for (const context of latent.random_contexts) {
    random.append(contextLine(context, latent.max_activation, number(context.activation) + " q" + Math.round(100 * context.quantile)));
  }
  panel.append(el("h3", {text: "Random firings (qN: percentile of this latent's activations)"}), random);
  markSelected();
}

// ---- hierarchy -----------------------------------------------------------------------------
function bestParent(latent) {
  let best = null;
  for (const link of latent.parents) {
    const group = LATENTS[link.latent].group;
    if (best === null || link.p_parent_given_child > best.p + 1e-9 ||
        (Math.abs(link.p_parent_given_child - best.p) <= 1e-9 && group > best.group)) {
      best = {latent: link.latent, p: link.p_parent_given_child, group: group, link: link};
    }
  }
  return best;
}
function renderHierarchy() {
  const note = document.getElementById("hierarchy-note"), tree = document.getElementById("hierarchy-tree");
  if (!DATA.hierarchy) { note.textContent = "No hierarchy statistics were collected."; return; }
  const s = DATA.settings;
  note.textContent = (DATA.hierarchy === "matryoshka"
      ? "Each latent of a later Matryoshka group is listed under the earlier-group latent that fires on most of the tokens where it fires"
      : "Each latent is listed under a more frequent latent that fires on most of the tokens where it fires") +
    " (P(parent | child) \u2265 " + s.min_parent_probability + " and \u2265 " + s.min_lift +
    "\u00d7 the parent's density, child fired \u2265 " + s.min_child_firings + " times); cos is the decoder cosine.";
  const kids = new Map(), hasParent = new Set();
  for (const latent of LATENTS) {
    const best = bestParent(latent);
    if (best === null) continue;
    hasParent.add(latent.index);
    if (!kids.has(best.latent)) kids.set(best.latent, []);
    kids.get(best.latent).push({child: latent.index, link: best.link});
  }
  const size = new Map();
  function descendants(i) {
    if (size.has(i)) return size.get(i);
    let n = 0;
    for (const k of kids.get(i) || []) n += 1 + descendants(k.child);
    size.set(i, n);
    return n;
  }
  const roots = [...kids.keys()].filter(i => !hasParent.has(i)).sort((a, b) => descendants(b) - descendants(a) || a - b);
  function node(i, link, depth) {
    const latent = LATENTS[i];
    const summary = el("summary", {}, [latentLink(i), " ", el("span", {"class": "badge", text: "g" + latent.group}), " ",
      chips(topTokens(latent, 4)),
      el("span", {"class": "muted", text: (link ? " P(parent|child) " + link.p_parent_given_child.toFixed(2) +
        ", cos " + link.decoder_cosine.toFixed(2) : "") + " \u00b7 " + percent(latent.density) +
        (descendants(i) ? " \u00b7 " + descendants(i) + " below" : "")})]);
    const details = el("details", {"class": "node", "data-latent": i}, [summary]);
    if (depth < 1) details.setAttribute("open", "");
    const children = (kids.get(i) || []).slice().sort((a, b) => b.link.p_parent_given_child - a.link.p_parent_given_child);
    for (const k of children) details.append(node(k.child, k.link, depth + 1));
    return details;
  }
  tree.replaceChildren();
  if (roots.length === 0) tree.append(el("p", {"class": "muted", text: "No parent/child pairs pass these thresholds."}));
  tree.append(el("p", {"class": "muted", text: roots.length + " root latents with " + hasParent.size + " descendants in all" +
    (roots.length > MAX_ROOTS ? "; the " + MAX_ROOTS + " largest trees shown" : "")}));
  for (const root of roots.slice(0, MAX_ROOTS)) tree.append(node(root, null, 0));
}

// ---- routing -------------------------------------------------------------------------------
function defaultLatent() {
  const alive = LATENTS.filter(l => l.fire_count > 0);
  return alive.length ? alive[0].index : 0;
}
function route() {
  const hash = location.hash.replace("#", "");
  const view = hash === "hierarchy" ? "hierarchy" : "latents";
  for (const name of ["latents", "hierarchy"]) {
    document.getElementById(name + "-view").classList.toggle("active", name === view);
    document.getElementById("tab-" + name).classList.toggle("active", name === view);
  }
  const match = /^latent-(\d+)$/.exec(hash);
  if (match && Number(match[1]) < LATENTS.length) renderLatent(Number(match[1]));
  else if (currentLatent === null) renderLatent(defaultLatent());
  window.scrollTo(0, 0);
}

renderNavigation();
renderSummary();
setUpIndex();
renderIndex();
renderHierarchy();
window.addEventListener("hashchange", route);
route();
document.body.setAttribute("data-rendered", "ok");
"""
