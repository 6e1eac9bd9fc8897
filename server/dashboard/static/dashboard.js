// dpfl dashboard: draws a page's charts from its embedded data, then polls the page's JSON
// endpoint about once a second. The endpoint answers 304 while nothing changed; otherwise the
// charts are redrawn and the server-rendered parts ([data-part]) are replaced.
(function () {
  "use strict";

  const page = JSON.parse(document.getElementById("page-data").textContent);
  const charts = {};
  const POLL_MS = 1000;
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
  // The browser test and curious users read the charts here.
  window.dpfl = { page: page, charts: charts };

  Chart.defaults.animation = false;
  Chart.defaults.maintainAspectRatio = false;

  function number(value) {
    return typeof value === "number" && isFinite(value) ? value : null;
  }

  // Create the chart on the canvas `id`, or give the existing one new data: no flicker on updates.
  function draw(id, config) {
    const canvas = document.getElementById(id);
    if (!canvas) return;
    if (charts[id]) {
      charts[id].data = config.data;
      charts[id].options = config.options;
      charts[id].update("none");
    } else {
      charts[id] = new Chart(canvas, config);
    }
  }

  function roundsAxis() {
    return { type: "linear", title: { display: true, text: "round" }, ticks: { precision: 0 } };
  }

  function drawRun(c) {
    draw("chart-accuracy", {
      type: "line",
      data: {
        labels: c.rounds,
        datasets: [
          { label: "test accuracy (%)", data: c.accuracy.map(number), borderColor: COLORS[0], yAxisID: "y" },
          { label: "test loss", data: c.loss.map(number), borderColor: COLORS[3], yAxisID: "loss" },
        ],
      },
      options: {
        scales: {
          x: { title: { display: true, text: "round" } },
          y: { position: "left", title: { display: true, text: "accuracy (%)" } },
          loss: { position: "right", title: { display: true, text: "loss" }, grid: { drawOnChartArea: false } },
        },
      },
    });
    const epsilonSets = [{ label: "ε (max over clients)", data: c.epsilon.map(number), borderColor: COLORS[1] }];
    if (c.budget !== null) {
      epsilonSets.push({
        label: "budget (target-epsilon)", data: c.rounds.map(function () { return c.budget; }),
        borderColor: "#999999", borderDash: [6, 4], pointRadius: 0,
      });
    }
    // Room above the budget, so that a line at the budget stays visible.
    const top = c.budget !== null ? 1.1 * c.budget : undefined;
    draw("chart-epsilon", {
      type: "line",
      data: { labels: c.rounds, datasets: epsilonSets },
      options: { scales: { x: { title: { display: true, text: "round" } }, y: { beginAtZero: true, suggestedMax: top } } },
    });
    const many = c.clients.length > 40;
    // Hundreds of clients: bars side by side without gaps or grid lines, which would hide them.
    const width = many ? { barPercentage: 1, categoryPercentage: 1 } : {};
    const datasets = [
      Object.assign({ label: "ε reported (lifetime)", data: c["client-epsilon"], backgroundColor: COLORS[0] }, width),
      Object.assign({ label: "unreported: bounded by the budget", data: c["client-bound"], backgroundColor: "#bbbbbb" }, width),
    ];
    if (c.budget !== null) {
      datasets.push({
        type: "line", label: "budget (target-epsilon)", data: c.clients.map(function () { return c.budget; }),
        borderColor: COLORS[1], borderDash: [6, 4], pointRadius: 0,
      });
    }
    draw("chart-clients", {
      type: "bar",
      data: { labels: c.clients, datasets: datasets },
      options: {
        scales: {
          x: { stacked: true, grid: { display: !many }, ticks: { display: !many }, title: { display: true, text: c.clients.length + " clients (node ids), largest ε first" } },
          y: { beginAtZero: true, suggestedMax: top, title: { display: true, text: "ε" } },
        },
        plugins: { tooltip: { mode: "index", intersect: false } },
      },
    });
  }

  function epsilonLabel(value) {
    return value === "inf" ? "non-private" : String(value);
  }

  function drawSweep(sweep) {
    const finite = sweep.rows.map(function (r) { return r["target-epsilon"]; }).filter(function (e) { return e !== "inf"; });
    const labels = Array.from(new Set(finite)).sort(function (a, b) { return a - b; }).map(String);
    if (sweep.rows.some(function (r) { return r["target-epsilon"] === "inf"; })) labels.push("non-private");
    const points = sweep.rows.filter(function (r) { return number(r.accuracy) !== null; }).map(function (r) {
      return { x: epsilonLabel(r["target-epsilon"]), y: 100 * r.accuracy };
    });
    const means = labels.map(function (label) {
      const ys = points.filter(function (p) { return p.x === label; }).map(function (p) { return p.y; });
      return ys.length ? ys.reduce(function (a, b) { return a + b; }, 0) / ys.length : null;
    });
    draw("chart-sweep", {
      type: "line",
      data: {
        labels: labels,
        datasets: [
          { label: "mean over repeats", data: means, borderColor: COLORS[0] },
          { label: "each run", data: points, showLine: false, borderColor: COLORS[3], backgroundColor: COLORS[3] },
        ],
      },
      options: {
        scales: {
          x: { type: "category", title: { display: true, text: "target ε per client" } },
          y: { title: { display: true, text: "test accuracy (%)" } },
        },
      },
    });
  }

  function drawCompare(data) {
    function series(key, scale) {
      return data.runs.map(function (run, i) {
        return {
          label: run.name + " (" + run.id + ")",
          data: run.rounds.map(function (r, k) {
            const y = number(run[key][k]);
            return { x: r, y: y === null ? null : y * scale };
          }),
          borderColor: COLORS[i % COLORS.length],
          backgroundColor: COLORS[i % COLORS.length],
        };
      });
    }
    draw("chart-compare-accuracy", {
      type: "line",
      data: { datasets: series("accuracy", 1) },
      options: { scales: { x: roundsAxis(), y: { title: { display: true, text: "test accuracy (%)" } } } },
    });
    draw("chart-compare-epsilon", {
      type: "line",
      data: { datasets: series("epsilon", 1) },
      options: { scales: { x: roundsAxis(), y: { beginAtZero: true, title: { display: true, text: "ε" } } } },
    });
  }

  // Swap in server-rendered parts, keeping which compare boxes were ticked.
  function replaceParts(html) {
    Object.keys(html || {}).forEach(function (name) {
      const element = document.querySelector('[data-part="' + name + '"]');
      if (!element) return;
      const ticked = new Set(Array.from(element.querySelectorAll("input[type=checkbox]:checked")).map(function (box) { return box.value; }));
      element.innerHTML = html[name];
      element.querySelectorAll("input[type=checkbox]").forEach(function (box) { box.checked = ticked.has(box.value); });
    });
  }

  function render(data) {
    if (data.charts) drawRun(data.charts);
    if (data.sweep) drawSweep(data.sweep);
    if (data.runs && page.runs) drawCompare(data);
    replaceParts(data.html);
  }

  let version = page.version;
  const url = page.api + (page.query ? "?" + page.query : "");

  function poll() {
    fetch(url, { cache: "no-cache", credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (data) {
        if (data && data.version !== version) {
          version = data.version;
          render(data);
        }
      })
      .catch(function () { /* the dashboard restarted or the network blinked: try again */ })
      .finally(function () { setTimeout(poll, POLL_MS); });
  }

  render(page);
  setTimeout(poll, POLL_MS);
})();
