// After a single upload: poll the study until it is scored, then say what came back — at once,
// including "not assessable — retake the image" when the model could not assess it.
(function () {
  const box = document.getElementById("single-result");
  if (!box) return;
  const text = document.getElementById("single-result-text");
  function show(r) {
    if (r.status === "failed") { text.textContent = "Could not be scored: " + (r.error || "unknown error"); text.className = "error"; return; }
    if (r.assessable === false) {
      text.innerHTML = "";
      const strong = document.createElement("strong");
      strong.className = "not-assessable";
      strong.id = "not-assessable";
      strong.textContent = "Not assessable: " + r.not_assessable_reason + ".";
      text.appendChild(strong);
      text.appendChild(document.createTextNode(" The model gives no answer for this image: please retake it and upload again. A specialist will also check it."));
      box.classList.add("notice");
      return;
    }
    text.textContent = "Probability of malignancy " + r.probability.toFixed(3) + " — " +
      (r.referred ? "referred to a specialist." : "not referred.");
  }
  function tick() {
    fetch(box.dataset.url, { headers: { Accept: "application/json" } }).then((r) => r.json()).then(function (r) {
      if (r.status === "done" || r.status === "failed") show(r); else setTimeout(tick, 700);
    }).catch(function () { setTimeout(tick, 3000); });
  }
  tick();
})();
