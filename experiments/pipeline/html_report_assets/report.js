// Paired-feature browser of a universality run (experiments/pipeline/html_report.py).
// Plain ES2017, no libraries, works from file://: data files are <script>s that call SAEU.put.
"use strict";
var SAEU = (function () {
  var store = {}, waiting = {};
  function put(key, value) {
    store[key] = value;
    (waiting[key] || []).forEach(function (w) { w.resolve(value); });
    delete waiting[key];
  }
  function load(key) {
    if (store[key] !== undefined) return Promise.resolve(store[key]);
    return new Promise(function (resolve, reject) {
      var first = !waiting[key];
      (waiting[key] = waiting[key] || []).push({ resolve: resolve, reject: reject });
      if (!first) return;
      var s = document.createElement("script");
      s.src = "data/" + key + ".js";
      s.onerror = function () {
        (waiting[key] || []).forEach(function (w) { w.reject(new Error("cannot load data/" + key + ".js")); });
        delete waiting[key];
      };
      document.head.appendChild(s);
    });
  }
  return { put: put, load: load, store: store };
})();

(function () {
  var O = SAEU_OVERVIEW, ALPHA = O.alpha, PAGE = 50;
  // Milliseconds since navigation start at each milestone (read by tests and bench_report).
  var T = window.SAEU_TIMING = {};
  var $ = function (id) { return document.getElementById(id); };

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "cls") e.className = attrs[k];
      else if (k === "style") e.setAttribute("style", attrs[k]);
      else e.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { if (c != null) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return e;
  }
  function fmt(x, nd) {
    if (x === null || x === undefined || (typeof x === "number" && isNaN(x))) return "-";
    if (typeof x !== "number") return String(x);
    if (nd === undefined) nd = 3;
    if (x !== 0 && Math.abs(x) < Math.pow(10, -nd)) return x.toExponential(1);
    return x.toFixed(nd);
  }
  // Token strings as tokenizers spell them: show the space / newline markers as text.
  function tokText(t) {
    return String(t).replace(/\u0120/g, " ").replace(/\u2581/g, " ").replace(/\u010a/g, "\u21b5").replace(/\n/g, "\u21b5");
  }
  function fid(side, f) { return side.toUpperCase() + "#" + f; }

  // ---- tabs -------------------------------------------------------------------------
  function showTab(name) {
    Array.prototype.forEach.call(document.querySelectorAll("nav .tab"), function (b) {
      b.classList.toggle("active", b.dataset.tab === name);
    });
    Array.prototype.forEach.call(document.querySelectorAll(".panel"), function (p) {
      p.classList.toggle("active", p.id === name);
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("nav .tab"), function (b) {
    b.addEventListener("click", function () { showTab(b.dataset.tab); });
  });

  // ---- overview ---------------------------------------------------------------------
  function runHead() {
    var h = O.head, parts = [];
    if (h.preset) parts.push("preset " + h.preset);
    if (h.models) parts.push("A " + h.models.a + "  |  B " + h.models.b);
    if (h.tokens) parts.push(h.tokens + " tokens");
    if (h.versions) parts.push("jax " + h.versions.jax);
    $("run-head").textContent = parts.join("  \u00b7  ");
  }

  function metricTable(metrics, skipped) {
    var t = el("table", { cls: "grid-table summary" });
    t.appendChild(el("thead", null, [el("tr", null, ["metric", "score", "null mean", "null std",
      "excess", "z", "p", "n/d", "kept"].map(function (h, i) { return el("th", { cls: i ? "" : "l", text: h }); }))]));
    var tb = el("tbody");
    Object.keys(metrics).forEach(function (m) {
      var r = metrics[m], sig = r.p !== null && r.p < ALPHA && r.excess > 0;
      var comps = r.components == null ? "" : [].concat(r.components).join("/");
      tb.appendChild(el("tr", { "data-metric": m }, [el("td", { cls: "l", text: m }),
        el("td", { text: fmt(r.score) }), el("td", { text: fmt(r.null_mean) }),
        el("td", { text: fmt(r.null_std) }), el("td", { text: fmt(r.excess) }),
        el("td", { text: fmt(r.z, 1) }),
        el("td", { cls: sig ? "sig" : "", text: fmt(r.p, 4) + (sig ? " *" : "") }),
        el("td", { text: fmt(r.n_over_d, 1) }), el("td", { text: comps })]));
    });
    Object.keys(skipped || {}).forEach(function (m) {
      tb.appendChild(el("tr", null, [el("td", { cls: "l", text: m }),
        el("td", { cls: "l muted", colspan: "8", text: "skipped: " + skipped[m] })]));
    });
    t.appendChild(tb);
    return t;
  }

  function funnel(filters) {
    var keys = Object.keys(filters || {});
    if (!keys.length) return null;
    var top = Math.max(1, filters[keys[0]]), box = el("div", { cls: "funnel" });
    keys.forEach(function (k) {
      box.appendChild(el("div", { cls: "l", text: k.replace(/^after_/, "after ").replace(/_/g, " ") }));
      box.appendChild(el("div", null, [el("div", { cls: "bar", style: "width:" + (100 * filters[k] / top).toFixed(1) + "%" })]));
      box.appendChild(el("div", { text: String(filters[k]) }));
    });
    return box;
  }

  function referenceTable() {
    var rp = O.reference_points || {}, ms = Object.keys(rp);
    if (!ms.length) return null;
    var t = el("table", { cls: "grid-table", id: "reference-table" });
    t.appendChild(el("thead", null, [el("tr", null, ["metric", "floor", "cross", "ceiling",
      "floor excess", "cross excess", "ceiling excess", "floor\u2192ceiling"].map(function (h, i) {
      return el("th", { cls: i ? "" : "l", text: h }); }))]));
    var tb = el("tbody");
    ms.forEach(function (m) {
      var e = rp[m], f = e.fraction_floor_to_ceiling_excess;
      tb.appendChild(el("tr", null, [el("td", { cls: "l", text: m }), el("td", { text: fmt(e.floor) }),
        el("td", { text: fmt(e.cross) }), el("td", { text: fmt(e.ceiling) }),
        el("td", { text: fmt(e.floor_excess) }), el("td", { text: fmt(e.cross_excess) }),
        el("td", { text: fmt(e.ceiling_excess) }),
        el("td", { text: f == null ? "-" : Math.round(100 * f) + "%" })]));
    });
    t.appendChild(tb);
    return t;
  }

  function heatColor(v, lo, hi) {
    if (v === null || v === undefined || isNaN(v)) return "#999";
    var t = hi > lo ? (v - lo) / (hi - lo) : 0.5;
    // A dark-blue -> teal -> yellow ramp (viridis-like), readable with white text.
    var stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [200, 200, 40]];
    var x = Math.max(0, Math.min(1, t)) * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), u = x - i;
    var c = stops[i].map(function (s, j) { return Math.round(s + u * (stops[i + 1][j] - s)); });
    return "rgb(" + c.join(",") + ")";
  }

  function gridHeatmaps() {
    var g = O.grid;
    if (!g || !g.cells) return null;
    var box = el("div", { id: "grid-heatmaps" });
    var byCell = {};
    O.comparisons.forEach(function (c) {
      if (c.hookpoint_a && (c.kind === "cross" || c.kind === "grid")) byCell[c.hookpoint_a + "|" + c.hookpoint_b] = c;
    });
    Object.keys(g.cells).forEach(function (m) {
      var vals = [].concat.apply([], g.cells[m]).filter(function (v) { return v !== null && !isNaN(v); });
      var lo = Math.min.apply(null, vals.concat([0])), hi = Math.max.apply(null, vals.concat([0]));
      var t = el("table", { cls: "grid-table heat", "data-metric": m });
      t.appendChild(el("caption", { cls: "l", text: m + ": excess over the null (* p < " + ALPHA + ")" }));
      t.appendChild(el("tr", null, [el("th", { text: "A \\ B" })].concat(g.layers_b.map(function (b) { return el("th", { text: b }); }))));
      g.layers_a.forEach(function (a, i) {
        var row = [el("th", { text: a })];
        g.layers_b.forEach(function (b, j) {
          var v = g.cells[m][i][j], c = byCell[a + "|" + b], r = c && c.metrics[m];
          var sig = r && r.p !== null && r.p < ALPHA && r.excess > 0;
          row.push(el("td", { style: "background:" + heatColor(v, lo, hi), cls: sig ? "cell-sig" : "cell",
            title: r ? "p=" + fmt(r.p, 4) + ", z=" + fmt(r.z, 1) : "no metrics",
            text: (v === null || isNaN(v) ? "-" : fmt(v, 2)) + (sig ? " *" : "") }));
        });
        t.appendChild(el("tr", null, row));
      });
      box.appendChild(t);
    });
    return box;
  }

  function overview() {
    var root = $("overview");
    root.appendChild(el("h2", { text: "Summary" }));
    O.comparisons.forEach(function (c) {
      var sec = el("div", { cls: "comparison", "data-name": c.name });
      var head = c.name + ": " + (c.label || "") + " (" + c.n_pairs + " pairs";
      if (c.pairing && c.pairing.mean_best_corr_ab != null) head += ", mean best corr A\u2192B " + fmt(c.pairing.mean_best_corr_ab);
      if (c.truth && c.truth.n_true_pairs) head += ", true pairs recovered " + Math.round(100 * c.truth.fraction_true_pairs_recovered) + "%";
      if (c.fraction_same_top_token != null) head += ", same top token " + Math.round(100 * c.fraction_same_top_token) + "%";
      sec.appendChild(el("h3", { text: head + ")" }));
      if (Object.keys(c.metrics || {}).length) sec.appendChild(metricTable(c.metrics, c.metrics_skipped));
      else if (Object.keys(c.metrics_before_threshold || {}).length) {
        sec.appendChild(el("div", { cls: "note", text: (c.note || "") + "; metrics on the " + c.n_pairs_before_threshold + " pairs before the threshold:" }));
        sec.appendChild(metricTable(c.metrics_before_threshold, c.metrics_skipped));
      } else if (c.note) sec.appendChild(el("div", { cls: "note", text: c.note }));
      if (c.verdict) sec.appendChild(el("div", { cls: "note verdict", text: c.verdict }));
      root.appendChild(sec);
    });
    var ref = referenceTable();
    if (ref) { root.appendChild(el("h2", { text: "Reference points: floor \u2192 cross \u2192 ceiling" })); root.appendChild(ref); }
    root.appendChild(el("h2", { text: "Filter funnel (candidate pairs after each filter)" }));
    O.comparisons.forEach(function (c) {
      var f = funnel(c.filters);
      if (f) { root.appendChild(el("h3", { text: c.name })); f.setAttribute("data-name", c.name); root.appendChild(f); }
    });
    var grid = gridHeatmaps();
    if (grid) { root.appendChild(el("h2", { text: "Layer grid" })); root.appendChild(grid); }
    if (O.plots.length) {
      root.appendChild(el("h2", { text: "Plots" }));
      root.appendChild(el("div", { cls: "plots" }, O.plots.map(function (p) { return el("img", { src: p, alt: p, title: p }); })));
    }
  }

  // ---- a paged, sortable, searchable table --------------------------------------------
  function PagedTable(opts) {
    // opts: table, count, page, prev, next, search, columns [{key, label, get(i), fmt, cls}],
    //       n(), match(i, q), onClick(i, tr), filter(i) (optional)
    var self = this;
    this.o = opts; this.sortKey = null; this.sortDir = 1; this.pageNo = 0; this.order = []; this.selected = null;
    opts.search.addEventListener("input", function () { self.pageNo = 0; self.refresh(); });
    opts.prev.addEventListener("click", function () { if (self.pageNo > 0) { self.pageNo--; self.render(); } });
    opts.next.addEventListener("click", function () { if ((self.pageNo + 1) * PAGE < self.order.length) { self.pageNo++; self.render(); } });
  }
  PagedTable.prototype.reset = function (columns, defaultSort) {
    var self = this, o = this.o;
    o.columns = columns; this.sortKey = defaultSort ? defaultSort[0] : null; this.sortDir = defaultSort ? defaultSort[1] : 1;
    this.pageNo = 0; this.selected = null;
    var head = el("tr", null, columns.map(function (c) {
      var th = el("th", { cls: "sortable " + (c.cls || ""), "data-key": c.key, text: c.label, title: c.title || "click to sort" });
      th.addEventListener("click", function () {
        if (self.sortKey === c.key) self.sortDir = -self.sortDir; else { self.sortKey = c.key; self.sortDir = c.desc ? -1 : 1; }
        self.pageNo = 0; self.refresh();
      });
      return th;
    }));
    var thead = o.table.querySelector("thead");
    thead.innerHTML = ""; thead.appendChild(head);
    this.refresh();
  };
  PagedTable.prototype.refresh = function () {
    var o = this.o, q = o.search.value.trim().toLowerCase(), n = o.n(), order = [];
    for (var i = 0; i < n; i++) if ((!o.filter || o.filter(i)) && (!q || o.match(i, q))) order.push(i);
    var col = null, self = this;
    o.columns.forEach(function (c) { if (c.key === self.sortKey) col = c; });
    if (col) {
      var keys = order.map(function (i) { return col.get(i); }), dir = this.sortDir, idx = order.map(function (_, j) { return j; });
      idx.sort(function (x, y) {
        var a = keys[x], b = keys[y];
        var an = a === null || a === undefined || (typeof a === "number" && isNaN(a));
        var bn = b === null || b === undefined || (typeof b === "number" && isNaN(b));
        if (an || bn) return an === bn ? x - y : (an ? 1 : -1);     // missing values last
        if (typeof a === "boolean") { a = +a; b = +b; }
        var r = typeof a === "string" ? a.localeCompare(b) : a - b;
        return r ? dir * r : x - y;
      });
      order = idx.map(function (j) { return order[j]; });
    }
    Array.prototype.forEach.call(o.table.querySelectorAll("thead th"), function (th) {
      th.classList.toggle("sorted-asc", th.dataset.key === self.sortKey && self.sortDir > 0);
      th.classList.toggle("sorted-desc", th.dataset.key === self.sortKey && self.sortDir < 0);
    });
    this.order = order;
    this.render();
  };
  PagedTable.prototype.render = function () {
    var o = this.o, self = this, tb = o.table.querySelector("tbody"), rows = this.order.slice(this.pageNo * PAGE, (this.pageNo + 1) * PAGE);
    tb.innerHTML = "";
    rows.forEach(function (i) {
      var tr = el("tr", { "data-row": String(i) }, o.columns.map(function (c) {
        var v = c.get(i);
        return el("td", { cls: c.cls || "", text: c.fmt ? c.fmt(v, i) : fmt(v) });
      }));
      if (self.selected === i) tr.classList.add("selected");
      tr.addEventListener("click", function () {
        self.selected = i;
        Array.prototype.forEach.call(tb.querySelectorAll("tr.selected"), function (r) { r.classList.remove("selected"); });
        tr.classList.add("selected");
        o.onClick(i, tr);
      });
      tb.appendChild(tr);
    });
    var pages = Math.max(1, Math.ceil(this.order.length / PAGE));
    o.count.textContent = this.order.length + " of " + o.n() + " rows";
    o.page.textContent = "page " + (this.pageNo + 1) + " / " + pages;
  };

  // ---- feature panels -------------------------------------------------------------------
  function histogram(heights, values, label) {
    if (!heights || !heights.length) return null;
    var w = 300, h = 70, n = heights.length, mx = Math.max.apply(null, heights.concat([1]));
    var ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", w); svg.setAttribute("height", h + 16); svg.setAttribute("class", "hist");
    heights.forEach(function (v, i) {
      var r = document.createElementNS(ns, "rect"), bh = Math.round(h * v / mx);
      r.setAttribute("x", (i * w / n).toFixed(1)); r.setAttribute("width", (w / n - 1).toFixed(1));
      r.setAttribute("y", h - bh); r.setAttribute("height", bh); r.setAttribute("fill", "#5b8db8");
      var t = document.createElementNS(ns, "title"); t.textContent = fmt(values[i]) + ": " + v; r.appendChild(t);
      svg.appendChild(r);
    });
    [[0, "start"], [n - 1, "end"]].forEach(function (p) {
      var t = document.createElementNS(ns, "text");
      t.setAttribute("x", p[1] === "start" ? 0 : w); t.setAttribute("y", h + 13); t.setAttribute("font-size", "10");
      t.setAttribute("text-anchor", p[1]); t.textContent = fmt(values[p[0]], 2); svg.appendChild(t);
    });
    return el("div", null, [el("div", { cls: "muted", text: label }), svg]);
  }

  function contextRow(act, maxAct) {
    var div = el("div", { cls: "context" });
    // Word-level vocabularies carry no space markers: separate their tokens by a space.
    var spaced = act.tokens.some(function (t) { return /^[\u0120\u2581 ]|^##/.test(t); });
    act.tokens.forEach(function (t, j) {
      if (!spaced && j > 0) div.appendChild(document.createTextNode(" "));
      var v = act.values[j], a = maxAct > 0 ? Math.max(0, Math.min(1, v / maxAct)) : 0;
      var span = el("span", { cls: "tok" + (j === act.qualifying_token_index ? " qual" : ""),
        title: tokText(t) + ": " + fmt(v), style: v > 0 ? "background: rgba(255,140,0," + (0.15 + 0.85 * a).toFixed(2) + ")" : "" });
      span.textContent = tokText(t);
      div.appendChild(span);
    });
    var q = act.qualifying_token_index;
    div.appendChild(el("span", { cls: "act", text: "\u2190 " + fmt(act.values[q]) }));
    return div;
  }

  function logitTables(f) {
    if (!f.pos_str || !f.pos_str.length) return null;
    function tbl(title, s, v) {
      return el("table", { cls: "grid-table" }, [el("tr", null, [el("th", { cls: "l", text: title }), el("th", { text: "logit" })])].concat(
        s.map(function (t, i) { return el("tr", null, [el("td", { cls: "l", text: tokText(t) }), el("td", { text: fmt(v[i]) })]); })));
    }
    return el("div", null, [el("div", { cls: "muted", text: "direct logit effect W_dec\u00b7W_U (final norm ignored)" }),
      el("div", { cls: "logits" }, [tbl("promoted", f.pos_str, f.pos_values), tbl("suppressed", f.neg_str, f.neg_values)])]);
  }

  function featurePanel(ci, side, f, cdata, extra) {
    var box = el("div", { cls: "feature", "data-side": side, "data-feature": String(f) });
    var ft = cdata.features[side], info = [];
    box.appendChild(el("h3", { text: "model " + side.toUpperCase() + " feature " + f + (extra ? "  " + extra : "") }));
    if (ft.density && ft.density.length > f) {
      info.push("density " + fmt(ft.density[f], 5), "max " + fmt(ft.max[f]));
      if (ft.importance) info.push("importance " + fmt(ft.importance[f]));
      if (ft.status[f]) info.push(ft.status[f] + (ft.reason[f] ? ": " + ft.reason[f] : ""));
      box.appendChild(el("div", { cls: "note", text: info.join("  \u00b7  ") }));
      box.appendChild(el("div", { cls: "note", text: "top tokens: " + (ft.top[f] || []).map(tokText).join(" | ") }));
    }
    var pages = cdata.has_pages[side], body = el("div", { cls: "loading", text: "loading\u2026" });
    box.appendChild(body);
    if (!pages) { body.textContent = "no per-feature pages in this run"; return box; }
    var k = Math.floor(f / pages.per_batch), key = "comp-" + ci + "-" + side + "-" + k;
    SAEU.load(key).then(function (batch) {
      var page = batch.features[f - k * pages.per_batch];
      body.className = ""; body.textContent = "";
      var h = histogram(page.freq_hist_data_bar_heights, page.freq_hist_data_bar_values, "activation histogram (non-zero activations, frac nonzero " + fmt(page.frac_nonzero, 5) + ")");
      if (h) body.appendChild(h);
      var lt = logitTables(page); if (lt) body.appendChild(lt);
      var lh = histogram(page.logits_hist_data_bar_heights, page.logits_hist_data_bar_values, "logit effects over the vocabulary");
      if (lh) body.appendChild(lh);
      body.appendChild(el("div", { cls: "muted", text: "top-activating contexts (top token outlined, its activation on the right)" }));
      var ctx = el("div", { cls: "contexts" });
      page.activations.forEach(function (a) { ctx.appendChild(contextRow(a, page.maxActApprox)); });
      if (!page.activations.length) ctx.appendChild(el("div", { cls: "muted", text: "never fired" }));
      body.appendChild(ctx);
      box.setAttribute("data-loaded", "1");
      T.lastFeature = performance.now();
    }, function (err) { body.textContent = String(err); });
    return box;
  }

  // ---- pairs tab -------------------------------------------------------------------------
  function compOptions(select) {
    O.comparisons.forEach(function (c) { select.appendChild(el("option", { value: String(c.id), text: c.name + (c.label ? " (" + c.label + ")" : "") })); });
    var cross = O.comparisons.filter(function (c) { return c.kind === "cross"; })[0];
    if (cross) select.value = String(cross.id);
  }
  function topOf(ft, f) { return (ft.top && ft.top[f]) || []; }

  var pairs = { data: null, ci: null };
  var pairTable = new PagedTable({
    table: $("pairs-table"), count: $("pairs-count"), page: $("pairs-page"), prev: $("pairs-prev"),
    next: $("pairs-next"), search: $("pairs-search"),
    n: function () { return pairs.data ? pairs.data.pairs.a.length : 0; },
    match: function (i, q) {
      var d = pairs.data, a = d.pairs.a[i], b = d.pairs.b[i];
      if (("a#" + a) === q || ("b#" + b) === q || String(a) === q || String(b) === q) return true;
      var toks = topOf(d.features.a, a).concat(topOf(d.features.b, b));
      return toks.some(function (t) { return tokText(t).toLowerCase().indexOf(q) >= 0; });
    },
    onClick: function (i) { showPair(i); }
  });
  function showPair(i) {
    var d = pairs.data, a = d.pairs.a[i], b = d.pairs.b[i], box = $("pair-detail");
    box.innerHTML = "";
    var v = "corr " + fmt(d.pairs.value[i]) + (d.pairs.dcos ? ", decoder cos " + fmt(d.pairs.dcos[i]) : "");
    box.appendChild(featurePanel(pairs.ci, "a", a, d, "(" + v + ")"));
    box.appendChild(featurePanel(pairs.ci, "b", b, d, ""));
  }
  function sameTop(d, i) {
    var ta = topOf(d.features.a, d.pairs.a[i]), tb = topOf(d.features.b, d.pairs.b[i]);
    return ta.length > 0 && tb.length > 0 && ta[0] === tb[0];
  }
  function loadPairs() {
    var ci = +$("pairs-comp").value, c = O.comparisons[ci];
    $("pair-detail").innerHTML = "";
    $("pairs-note").textContent = "loading\u2026";
    SAEU.load("comp-" + ci).then(function (d) {
      pairs.data = d; pairs.ci = ci;
      var value = c.pairing && c.pairing.method === "decoder" ? "decoder cos (pairing)" : "activation corr";
      var cols = [
        { key: "rank", label: "#", get: function (i) { return i; }, fmt: function (v) { return String(v + 1); } },
        { key: "a", label: "A feature", get: function (i) { return d.pairs.a[i]; }, fmt: String },
        { key: "b", label: "B feature", get: function (i) { return d.pairs.b[i]; }, fmt: String },
        { key: "value", label: value, desc: true, get: function (i) { return d.pairs.value[i]; } }];
      if (d.pairs.dcos) cols.push({ key: "dcos", label: "decoder cos", desc: true, title: "meaningful only when both SAEs read the same activation space", get: function (i) { return d.pairs.dcos[i]; } });
      cols.push(
        { key: "da", label: "density A", desc: true, get: function (i) { return (d.features.a.density || [])[d.pairs.a[i]]; }, fmt: function (v) { return fmt(v, 5); } },
        { key: "db", label: "density B", desc: true, get: function (i) { return (d.features.b.density || [])[d.pairs.b[i]]; }, fmt: function (v) { return fmt(v, 5); } });
      if (d.features.a.importance || d.features.b.importance) cols.push(
        { key: "imp", label: "importance (min)", desc: true, get: function (i) {
          var x = d.features.a.importance ? d.features.a.importance[d.pairs.a[i]] : null, y = d.features.b.importance ? d.features.b.importance[d.pairs.b[i]] : null;
          return x === null ? y : (y === null ? x : Math.min(x, y)); } });
      cols.push(
        { key: "same", label: "same top token", desc: true, get: function (i) { return sameTop(d, i); }, fmt: function (v) { return v ? "yes" : "no"; } },
        { key: "ta", label: "top tokens A", cls: "toks", get: function (i) { return topOf(d.features.a, d.pairs.a[i]).map(tokText).join(" | "); }, fmt: String },
        { key: "tb", label: "top tokens B", cls: "toks", get: function (i) { return topOf(d.features.b, d.pairs.b[i]).map(tokText).join(" | "); }, fmt: String });
      $("pairs-note").textContent = d.pairs.a.length ? "click a pair to see both features side by side" : "no kept pairs in this comparison" + (c.note ? ": " + c.note : "");
      pairTable.reset(cols, ["value", -1]);
      if (T.pairs === undefined) T.pairs = performance.now();
    }, function (err) { $("pairs-note").textContent = String(err); });
  }

  // ---- features tab ----------------------------------------------------------------------
  var feats = { data: null, ci: null, side: "a" };
  var STATUS = [["all", "all"], ["kept", "kept"], ["dropped", "dropped (any reason)"], ["dead", "dead"],
    ["constant", "constant"], ["non_concept", "non-concept"], ["one_to_one", "lost one-to-one"],
    ["threshold", "below threshold"], ["partner_dead_constant", "partner dead/constant"],
    ["partner_non_concept", "partner non-concept"], ["no_candidate", "no candidate"]];
  STATUS.forEach(function (s) { $("feat-status").appendChild(el("option", { value: s[0], text: s[1] })); });
  var featTable = new PagedTable({
    table: $("feat-table"), count: $("feat-count"), page: $("feat-page"), prev: $("feat-prev"),
    next: $("feat-next"), search: $("feat-search"),
    n: function () { return feats.data ? feats.data.features[feats.side].density.length : 0; },
    filter: function (i) {
      var s = $("feat-status").value, ft = feats.data.features[feats.side];
      if (s === "all") return true;
      if (s === "kept" || s === "dropped") return ft.status[i] === s;
      return ft.drop[i] === s;
    },
    match: function (i, q) {
      var ft = feats.data.features[feats.side];
      if ((feats.side + "#" + i) === q || String(i) === q) return true;
      if ((ft.reason[i] || "").toLowerCase().indexOf(q) >= 0) return true;
      return topOf(ft, i).some(function (t) { return tokText(t).toLowerCase().indexOf(q) >= 0; });
    },
    onClick: function (i) {
      var box = $("feat-detail"), ft = feats.data.features[feats.side];
      box.innerHTML = "";
      box.appendChild(featurePanel(feats.ci, feats.side, i, feats.data, ""));
      var p = ft.partner[i];
      if (p !== null && p !== undefined) {
        var other = feats.side === "a" ? "b" : "a";
        box.appendChild(featurePanel(feats.ci, other, p, feats.data, "(" + (ft.status[i] === "kept" ? "kept partner" : "best candidate partner") + ", value " + fmt(ft.partner_value[i]) + ")"));
      }
    }
  });
  function loadFeatures() {
    var ci = +$("feat-comp").value;
    feats.side = $("feat-side").value;
    $("feat-detail").innerHTML = "";
    SAEU.load("comp-" + ci).then(function (d) {
      feats.data = d; feats.ci = ci;
      var ft = d.features[feats.side];
      var cols = [
        { key: "f", label: "feature", get: function (i) { return i; }, fmt: String },
        { key: "status", label: "status", cls: "l", get: function (i) { return ft.status[i]; }, fmt: String },
        { key: "reason", label: "reason dropped", cls: "l", get: function (i) { return ft.reason[i] || ""; }, fmt: String },
        { key: "partner", label: "partner", get: function (i) { return ft.partner[i]; }, fmt: function (v) { return v === null || v === undefined ? "-" : String(v); } },
        { key: "pv", label: "partner value", desc: true, get: function (i) { return ft.partner_value[i]; } },
        { key: "density", label: "density", desc: true, get: function (i) { return ft.density[i]; }, fmt: function (v) { return fmt(v, 5); } },
        { key: "max", label: "max act", desc: true, get: function (i) { return ft.max[i]; } }];
      if (ft.importance) cols.push({ key: "imp", label: "importance", desc: true, get: function (i) { return ft.importance[i]; } });
      cols.push({ key: "top", label: "top tokens", cls: "toks", get: function (i) { return topOf(ft, i).map(tokText).join(" | "); }, fmt: String });
      featTable.reset(cols, null);
    });
  }

  // ---- start -----------------------------------------------------------------------------
  runHead();
  overview();
  T.overview = performance.now();
  compOptions($("pairs-comp"));
  compOptions($("feat-comp"));
  $("pairs-comp").addEventListener("change", loadPairs);
  $("feat-comp").addEventListener("change", loadFeatures);
  $("feat-side").addEventListener("change", loadFeatures);
  $("feat-status").addEventListener("change", function () { featTable.pageNo = 0; featTable.refresh(); });
  if (O.comparisons.length) { loadPairs(); loadFeatures(); }
  window.SAEU_READY = true;
})();
