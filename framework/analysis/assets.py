"""The dashboard's stylesheet and script, inlined into every page.

Inline rather than linked so a page is one self-contained file: it opens from disk (file://)
with no server, survives being copied alone, and loads nothing from a CDN. The script is
small vanilla JS: a search box filtering the index table and sorting by column header.
"""

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin: 0.2em 0; } h2 { font-size: 1.15em; margin: 1.4em 0 0.4em; }
a { color: #1f5fa8; text-decoration: none; } a:hover { text-decoration: underline; }
nav { margin-bottom: 0.8em; } nav a { margin-right: 1.2em; }
.meta { color: #555; } .muted { color: #888; }
table { border-collapse: collapse; } td, th { padding: 3px 8px; text-align: left; vertical-align: top; }
thead th { border-bottom: 2px solid #ccc; background: #f6f6f6; position: sticky; top: 0; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafafa; }
th.sortable { cursor: pointer; user-select: none; } th.sortable:after { content: " \\2195"; color: #aaa; }
th[data-dir=asc]:after { content: " \\2191"; color: #333; } th[data-dir=desc]:after { content: " \\2193"; color: #333; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
#search { font-size: 1em; padding: 4px 8px; width: 22em; margin: 0.4em 0.8em 0.8em 0; }
.tok { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; white-space: pre;
       background: #eef1f5; border-radius: 3px; padding: 0 3px; margin: 0 1px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 0 2em; }
.pos { color: #1a7f37; } .neg { color: #b42318; }
.ex { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 13px;
      white-space: pre-wrap; word-break: break-all; line-height: 1.7; }
.ex span { border-radius: 2px; } .ex .focus { outline: 1.5px solid #c2410c; }
.examples td.act { width: 4.5em; text-align: right; color: #555; font-variant-numeric: tabular-nums; }
.ws { color: #aaa; }
svg { max-width: 520px; display: block; } svg text { font: 11px system-ui, sans-serif; fill: #555; }
"""

INDEX_SCRIPT = """
(function () {
  "use strict";
  var table = document.getElementById("units");
  var body = table.tBodies[0];
  var search = document.getElementById("search");
  var count = document.getElementById("count");
  function filter() {
    var query = search.value.trim().toLowerCase();
    var shown = 0;
    Array.prototype.forEach.call(body.rows, function (row) {
      var match = row.textContent.toLowerCase().indexOf(query) !== -1;
      row.hidden = !match;
      if (match) { shown += 1; }
    });
    count.textContent = shown + " of " + body.rows.length + " shown";
  }
  function key(row, column, numeric) {
    var cell = row.cells[column];
    var value = cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent;
    return numeric ? parseFloat(value) : value.toLowerCase();
  }
  function sortBy(header) {
    var numeric = header.getAttribute("data-type") === "num";
    var current = header.getAttribute("data-dir");
    var dir = current ? (current === "asc" ? "desc" : "asc") : (numeric ? "desc" : "asc");
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (cell) {
      cell.removeAttribute("data-dir");
    });
    header.setAttribute("data-dir", dir);
    var column = header.cellIndex;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a, column, numeric), y = key(b, column, numeric);
      if (numeric) {
        if (isNaN(x)) { return 1; }
        if (isNaN(y)) { return -1; }
      }
      var order = x < y ? -1 : (x > y ? 1 : 0);
      return dir === "asc" ? order : -order;
    });
    var fragment = document.createDocumentFragment();
    rows.forEach(function (row) { fragment.appendChild(row); });
    body.appendChild(fragment);
  }
  table.tHead.addEventListener("click", function (event) {
    var header = event.target.closest("th.sortable");
    if (header) { sortBy(header); }
  });
  search.addEventListener("input", filter);
  filter();
})();
"""
