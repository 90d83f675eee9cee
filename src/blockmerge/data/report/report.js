// blockmerge report: switch variant group / prompt / metric, lightbox, sortable tables.
// Plain ES2015, no libraries, no network: the page must work from file:// offline.
(function () {
  "use strict";
  var dataEl = document.getElementById("report-data");
  var DATA = dataEl ? JSON.parse(dataEl.textContent) : null;

  function byId(id) { return document.getElementById(id); }

  function fillImages(cell, imgs, block) {
    var box = cell.querySelector(".imgs");
    if (!box) return;
    while (box.firstChild) box.removeChild(box.firstChild);
    (imgs || []).forEach(function (im, i) {
      if (!im) {
        var s = document.createElement("span");
        s.className = "missing";
        s.textContent = "seed " + DATA.seeds[i] + ": no image";
        box.appendChild(s);
        return;
      }
      var a = document.createElement("a");
      a.className = "full";
      a.href = im.href;
      a.setAttribute("data-caption", block + " · seed " + im.seed);
      var img = document.createElement("img");
      img.src = im.src;
      img.alt = block + " seed " + im.seed;
      img.title = "seed " + im.seed;
      a.appendChild(img);
      box.appendChild(a);
    });
  }

  function update() {
    if (!DATA) return;
    var g = byId("group").value, p = byId("prompt").value, m = byId("metric").value;
    var cells = document.querySelectorAll(".cell[data-block]");
    for (var i = 0; i < cells.length; i++) {
      var el = cells[i], b = el.getAttribute("data-block");
      if (b === "baseline") { fillImages(el, DATA.baseline.imgs[p], "baseline"); continue; }
      var c = (DATA.cells[g] || {})[b];
      var mv = el.querySelector(".metric-value");
      var bl = el.querySelector(".block");
      if (bl) bl.title = (c && c.note) || "";
      fillImages(el, c ? c.imgs[p] : [], b);
      if (!c) {
        mv.textContent = "not run"; mv.title = "";
        el.style.background = ""; el.style.color = "";
        el.querySelector(".metric-all").textContent = "";
        el.querySelector(".vals").textContent = "";
        el.removeAttribute("data-variant");
        continue;
      }
      var v = c.v[p][m];
      mv.textContent = v[0]; mv.title = v[1];
      el.style.background = v[2]; el.style.color = v[3];
      el.querySelector(".metric-all").textContent = "all prompts: " + c.v.all[m][0];
      el.querySelector(".vals").textContent = c.vals[p];
      el.setAttribute("data-variant", c.variant);
    }
    var customs = document.querySelectorAll(".cell.custom[data-variant]");
    for (var k = 0; k < customs.length && DATA.custom; k++) {
      var cv = DATA.custom[k];
      if (!cv || cv.variant !== customs[k].getAttribute("data-variant")) continue;
      fillImages(customs[k], cv.imgs[p], cv.label);
      customs[k].querySelector(".vals").textContent = cv.vals[p];
    }
    var hm = byId("heatmap");
    if (hm && DATA.heatmaps[g] && DATA.heatmaps[g][m]) hm.src = DATA.heatmaps[g][m];
    byId("prompt-text").textContent = DATA.prompts[p];
    byId("metric-desc").textContent = DATA.metricDesc[m];
  }

  function lightbox() {
    var box = byId("lightbox");
    if (!box) return;
    var img = box.querySelector("img"), cap = box.querySelector(".caption");
    document.addEventListener("click", function (e) {
      var a = e.target.closest ? e.target.closest("a.full") : null;
      if (a) {
        e.preventDefault();
        img.src = a.getAttribute("href");
        cap.textContent = a.getAttribute("data-caption") || "";
        box.hidden = false;
      } else if (!box.hidden && box.contains(e.target)) {
        box.hidden = true;
      }
    });
    document.addEventListener("keydown", function (e) {
      if (e.key === "Escape") box.hidden = true;
    });
  }

  function sortable() {
    var tables = document.querySelectorAll("table.sortable");
    Array.prototype.forEach.call(tables, function (t) {
      var ths = t.querySelectorAll("thead th");
      Array.prototype.forEach.call(ths, function (th, col) {
        th.addEventListener("click", function () {
          var asc = th.getAttribute("data-dir") !== "asc";
          Array.prototype.forEach.call(ths, function (o) { o.removeAttribute("data-dir"); });
          th.setAttribute("data-dir", asc ? "asc" : "desc");
          var body = t.tBodies[0];
          var rows = Array.prototype.slice.call(body.rows);
          rows.sort(function (r1, r2) {
            var a = r1.cells[col], b = r2.cells[col];
            var x = a.getAttribute("data-v"), y = b.getAttribute("data-v");
            var nx = x === null || x === "" ? NaN : Number(x), ny = y === null || y === "" ? NaN : Number(y);
            var d;
            if (x !== null || y !== null) {
              // numbers; empty (no data) always last
              if (isNaN(nx) && isNaN(ny)) d = 0;
              else if (isNaN(nx)) return 1;
              else if (isNaN(ny)) return -1;
              else d = nx === ny ? 0 : (nx < ny ? -1 : 1);
            } else {
              d = a.textContent.localeCompare(b.textContent);
            }
            return asc ? d : -d;
          });
          rows.forEach(function (r) { body.appendChild(r); });
        });
      });
    });
  }

  if (DATA) {
    ["group", "prompt", "metric"].forEach(function (id) {
      var s = byId(id);
      if (s) s.addEventListener("change", update);
    });
    update();
  }
  lightbox();
  sortable();
})();
