// Live batch progress: poll the status endpoint until the batch is complete, then reload the table once.
(function () {
  const box = document.getElementById("progress");
  if (!box) return;
  const url = box.dataset.statusUrl;
  let wasRunning = document.getElementById("batch-state").textContent.trim() === "running";
  function tick() {
    fetch(url, { headers: { Accept: "application/json" } }).then((r) => r.json()).then(function (s) {
      // a batch that has just finished reloads at once: its final state is shown only by the page
      // that also holds the final table, never on the old page that is about to go away
      if (s.state !== "running" && wasRunning) { window.location.reload(); return; }
      document.getElementById("batch-bar").value = s.progress;
      document.getElementById("batch-state").textContent = s.state;
      Object.keys(s.counts).forEach(function (k) { const el = document.getElementById("count-" + k); if (el) el.textContent = s.counts[k]; });
      if (s.state === "running") { wasRunning = true; setTimeout(tick, 1500); }
    }).catch(function () { setTimeout(tick, 5000); });
  }
  tick();
})();
