(function () {
  const toggle = document.getElementById("toggle-heatmap");
  const heat = document.getElementById("heatmap");
  if (toggle && heat) toggle.addEventListener("change", function () { heat.hidden = !toggle.checked; });
})();

(function () {
  // lesion follow-up: two visits side by side, the same size, the heat maps toggled together
  const both = document.getElementById("compare-heatmaps");
  const sides = ["a", "b"];
  function show(side) {
    const select = document.getElementById("compare-" + side);
    if (!select) return;
    const option = select.options[select.selectedIndex];
    const image = document.getElementById("compare-" + side + "-image");
    const heat = document.getElementById("compare-" + side + "-heatmap");
    image.src = option.dataset.image;
    heat.src = option.dataset.heatmap || "";
    heat.hidden = !(both && both.checked && option.dataset.heatmap);
    document.getElementById("compare-" + side + "-caption").textContent =
      option.textContent + (both && both.checked && !option.dataset.heatmap ? " (no heat map)" : "");
  }
  sides.forEach(function (side) {
    const select = document.getElementById("compare-" + side);
    if (select) select.addEventListener("change", function () { show(side); });
  });
  if (both) both.addEventListener("change", function () { sides.forEach(show); });
  sides.forEach(show);
})();

(function () {
  // "Release back to the queue" asks first
  const release = document.getElementById("release-form");
  if (release) release.addEventListener("submit", function (event) {
    if (!window.confirm(release.dataset.confirm)) event.preventDefault();
  });
})();
