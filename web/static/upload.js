// Bulk upload with a progress bar and the per-row validation report, without leaving the page.
(function () {
  const form = document.getElementById("bulk-form");
  if (!form) return;
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    const xhr = new XMLHttpRequest();
    const bar = document.getElementById("upload-bar");
    const text = document.getElementById("upload-text");
    const report = document.getElementById("bulk-report");
    document.getElementById("bulk-progress").hidden = false;
    report.textContent = "";
    xhr.upload.onprogress = function (e) {
      if (e.lengthComputable) { bar.value = (100 * e.loaded) / e.total; text.textContent = "uploading " + Math.round(bar.value) + " %"; }
    };
    xhr.upload.onload = function () { text.textContent = "checking and storing…"; };
    xhr.onload = function () {
      let data;
      try { data = JSON.parse(xhr.responseText); } catch (err) { text.textContent = "upload failed (" + xhr.status + ")"; return; }
      bar.value = 100;
      if (data.error || data.errors) { text.textContent = data.error || JSON.stringify(data.errors); text.className = "error"; return; }
      text.textContent = "";
      const summary = document.createElement("p");
      summary.id = "report-summary";
      summary.innerHTML = "<strong>" + data.accepted + "</strong> accepted, <strong>" + data.rejected + "</strong> rejected. ";
      if (data.batch_url) { const a = document.createElement("a"); a.href = data.batch_url; a.id = "batch-link"; a.textContent = "Follow the batch"; summary.appendChild(a); }
      report.appendChild(summary);
      const table = document.createElement("table");
      table.className = "grid"; table.id = "report-table";
      table.innerHTML = "<thead><tr><th>Row</th><th>Reference</th><th>Status</th><th>Reason / study</th></tr></thead>";
      const body = document.createElement("tbody");
      data.records.sort((a, b) => (a.row || 0) - (b.row || 0)).forEach(function (r) {
        const tr = document.createElement("tr");
        tr.className = r.status;
        [r.row, r.external_id || "", r.status, r.status === "rejected" ? r.reason : "study " + r.study_id + (r.duplicate ? " (already known)" : "")].forEach(function (v) {
          const td = document.createElement("td"); td.textContent = v === undefined ? "" : v; tr.appendChild(td);
        });
        body.appendChild(tr);
      });
      table.appendChild(body);
      report.appendChild(table);
    };
    xhr.onerror = function () { text.textContent = "network error: nothing was lost on the server; try again"; };
    xhr.open("POST", form.action);
    xhr.setRequestHeader("X-Requested-With", "XMLHttpRequest");
    xhr.setRequestHeader("Accept", "application/json");
    xhr.send(new FormData(form));
  });
})();
