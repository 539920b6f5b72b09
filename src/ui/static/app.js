// Secrets page: progressive enhancement only. Without this file every form still works;
// with it, the value can be revealed while typing and the name is checked as it is typed.
"use strict";

(function () {
  // Eye toggle: the button is hidden in the HTML and shown only when it can work.
  document.querySelectorAll("button.reveal").forEach(function (button) {
    var input = document.getElementById(button.getAttribute("aria-controls"));
    var label = button.querySelector(".reveal-label");
    if (!input) return;
    button.hidden = false;
    button.addEventListener("click", function () {
      var show = input.type === "password";
      input.type = show ? "text" : "password";
      button.setAttribute("aria-pressed", show ? "true" : "false");
      if (label) label.textContent = show ? "Hide value" : "Show value";
      input.focus();
    });
    // Never leave a value on screen when the form is sent.
    if (input.form) {
      input.form.addEventListener("submit", function () {
        input.type = "password";
      });
    }
  });

  // Live name validation: the server's own rule (the same function the API uses), so the
  // message here is exactly what saving would say.
  var name = document.getElementById("env_name");
  var message = document.getElementById("env_name-error");
  if (name && message && name.dataset.checkUrl) {
    var timer = null;
    var latest = 0;
    var show = function (text) {
      message.textContent = text || "";
      if (text) {
        name.setAttribute("aria-invalid", "true");
        name.closest(".field").classList.add("has-error");
      } else {
        name.removeAttribute("aria-invalid");
        name.closest(".field").classList.remove("has-error");
      }
    };
    var check = function () {
      var value = name.value;
      if (value === "") { show(""); return; }
      var ticket = ++latest;
      fetch(name.dataset.checkUrl + "?name=" + encodeURIComponent(value), {
        credentials: "same-origin",
        headers: { "Accept": "application/json" }
      })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (result) {
          if (result && ticket === latest) show(result.valid ? "" : result.message);
        })
        .catch(function () { /* the server checks again on save */ });
    };
    name.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(check, 150);
    });
  }

  // After a refused save, take keyboard and screen-reader focus to the list of problems.
  var summary = document.getElementById("error-summary");
  if (summary) summary.focus();
})();
