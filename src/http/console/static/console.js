// The template editor's live preview: after each pause in typing, the files as they stand are
// rendered by the API (POST /api/templates/{trigger}/{locale}/preview) and shown: the email in
// a sandboxed iframe (no scripts), the SMS with its segments, errors by file and line.
(function () {
  "use strict";
  const editor = document.querySelector(".editor");
  if (!editor) return;
  const trigger = editor.dataset.trigger;
  const locale = editor.dataset.locale;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const areas = Array.from(editor.querySelectorAll("textarea[data-file]"));
  const member = document.getElementById("member");
  const state = document.getElementById("preview-state");
  const errors = document.getElementById("errors-live");
  let timer = null;
  let asked = 0;

  function files() {
    const out = {};
    for (const area of areas) out[area.dataset.file] = area.value === "" ? null : area.value;
    return out;
  }

  function showErrors(list) {
    errors.textContent = "";
    for (const area of areas) area.removeAttribute("aria-invalid");
    for (const e of list) {
      const li = document.createElement("li");
      li.textContent = (e.file ? e.file + (e.line ? " line " + e.line : "") + ": " : "") + e.message;
      errors.appendChild(li);
      const area = areas.find((a) => a.dataset.file === e.file);
      if (area) area.setAttribute("aria-invalid", "true");
    }
  }

  async function refresh() {
    const mine = ++asked;
    state.textContent = "Rendering…";
    const body = { files: files() };
    if (member.value.trim() !== "") body.member_id = member.value.trim();
    let response;
    try {
      response = await fetch("/api/templates/" + encodeURIComponent(trigger) + "/" + encodeURIComponent(locale) + "/preview", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        credentials: "same-origin",
        body: JSON.stringify(body),
      });
    } catch (e) {
      state.textContent = "The preview could not be fetched.";
      return;
    }
    if (mine !== asked) return; // a newer preview is on its way
    const answer = await response.json().catch(() => ({ error: "unreadable answer" }));
    if (response.ok) {
      showErrors([]);
      document.getElementById("subject").textContent = answer.email.subject;
      document.getElementById("email-frame").srcdoc = answer.email.html;
      document.getElementById("text-part").textContent = answer.email.text;
      document.getElementById("sms-body").textContent = answer.sms.body;
      document.getElementById("sms-meta").textContent =
        answer.sms.segments + " segment" + (answer.sms.segments === 1 ? "" : "s") + ", " + answer.sms.encoding;
      state.textContent = "Preview up to date.";
    } else {
      showErrors(answer.errors || [{ file: "", line: null, message: answer.error }]);
      state.textContent = "The preview shows the last version that rendered.";
    }
  }

  function soon() {
    clearTimeout(timer);
    timer = setTimeout(refresh, 300);
  }
  for (const area of areas) area.addEventListener("input", soon);
  member.addEventListener("input", soon);
  refresh();
})();
