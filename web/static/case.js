(function () {
  const toggle = document.getElementById("toggle-heatmap");
  const heat = document.getElementById("heatmap");
  if (toggle && heat) toggle.addEventListener("change", function () { heat.hidden = !toggle.checked; });
})();
