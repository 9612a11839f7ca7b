// vmbak dashboard: draws the charts of a disk's page (uPlot) and shows action errors.
(function () {
  "use strict";

  function flash(text) {
    var el = document.getElementById("flash");
    if (!el) {
      el = document.createElement("div");
      el.id = "flash";
      document.body.appendChild(el);
    }
    el.textContent = text;
    clearTimeout(el._t);
    el._t = setTimeout(function () { el.remove(); }, 8000);
  }

  document.addEventListener("htmx:responseError", function (ev) {
    var text = ev.detail.xhr.responseText || "";
    try { text = JSON.parse(text).detail || text; } catch (e) { /* not JSON: show it as it is */ }
    if (ev.detail.xhr.status === 401) { window.location = "/login"; return; }
    flash(text.replace(/<[^>]*>/g, "").trim() || ("error " + ev.detail.xhr.status));
  });

  function bytes(v) {
    if (v == null) return "";
    var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (Math.abs(v) >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(1) : v.toFixed(0)) + " " + u[i];
  }

  function chart(id, series, data, yfmt) {
    var el = document.getElementById(id);
    if (!el || typeof uPlot === "undefined") return;
    var opts = {
      width: Math.max(el.clientWidth, 300), height: 200,
      series: [{}].concat(series),
      axes: [{}, { values: function (u, vals) { return vals.map(yfmt); }, size: 86 }],
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
    };
    var plot = new uPlot(opts, data, el);
    window.addEventListener("resize", function () {
      plot.setSize({ width: Math.max(el.clientWidth, 300), height: 200 });
    });
  }

  function charts() {
    var src = document.getElementById("series");
    if (!src) return;
    var s = JSON.parse(src.textContent);
    chart("c-stored", [
      { label: "stored", stroke: "#2f6fdb", fill: "rgba(47,111,219,.12)", width: 2, value: function (u, v) { return bytes(v); } },
      { label: "read", stroke: "#1f9d55", width: 1.5, value: function (u, v) { return bytes(v); } },
    ], [s.t, s.stored, s.read], bytes);
    chart("c-ratio", [
      { label: "dedup", stroke: "#8a4fd6", width: 2, spanGaps: true, value: function (u, v) { return v == null ? "" : v.toFixed(2) + "×"; } },
      { label: "compression", stroke: "#d98a00", width: 2, spanGaps: true, value: function (u, v) { return v == null ? "" : v.toFixed(2) + "×"; } },
    ], [s.t, s.dedup, s.compression], function (v) { return v == null ? "" : v.toFixed(1) + "×"; });
    chart("c-duration", [
      { label: "duration", stroke: "#d64545", width: 2, spanGaps: true, value: function (u, v) { return v == null ? "" : v.toFixed(1) + " s"; } },
    ], [s.t, s.duration], function (v) { return v == null ? "" : v + " s"; });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", charts);
  else charts();
})();
