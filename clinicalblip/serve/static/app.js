// The page at /: the same REST API a hospital integration calls, from plain JavaScript (no framework, no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
const files = { frontal: null, lateral: null, prior: null };
const VALUE_NAME = { "1": "positive", "-1": "uncertain", "0": "negative", "null": "not mentioned" };

function showError(msg) {
  const el = $("error");
  el.textContent = msg || "";
  el.hidden = !msg;
}

async function errorText(resp, withField = true) {
  try {
    const body = await resp.json();
    if (body.error) return (withField ? `${body.error.field}: ` : "") + `${body.error.message} (HTTP ${resp.status})`;
  } catch (e) { /* not JSON */ }
  return `HTTP ${resp.status}`;
}

async function loadModel() {
  const resp = await fetch("/v1/model");
  if (!resp.ok) { $("model-line").textContent = "model information unavailable: " + await errorText(resp); return; }
  const m = await resp.json();
  $("model-line").textContent = `${m.kind} · stages ${m.stages.join(" → ") || "-"} · model hash ${m.model_hash} · ` +
    `clinicalblip ${m.code_version}`;
  const sel = $("template");
  for (const name of m.templates) {
    const opt = document.createElement("option");
    opt.value = opt.textContent = name;
    if (name === m.template.name) opt.selected = true;
    sel.appendChild(opt);
  }
  $("max_new_tokens").value = m.decoding_defaults.max_new_tokens;
  $("max_new_tokens").max = m.limits.max_new_tokens;
  $("num_beams").max = m.limits.max_beams;
  const takes = (m.prior && m.prior.takes) || "none";
  $("prior-takes").textContent = takes === "none" ? "(this model takes no prior study)"
    : `(this model takes the prior's ${takes === "both" ? "images and report" : takes})`;
  $("prior-drop").hidden = !(takes === "images" || takes === "both");
  $("prior_report").disabled = !(takes === "report" || takes === "both");
  $("compare-prior-button").disabled = takes === "none";
  $("prior-panel").dataset.takes = takes;
  $("about-text").textContent = m.card.intended_use;
  const base = m.base ? (m.base.name || m.base.path || "") : "";
  $("about-meta").textContent = `Base: ${base} · template ${m.template.name} (slots: ${m.template.slots.join(", ")}) · ` +
    `up to ${m.limits.max_views} views per study, ${Math.round(m.limits.max_file_bytes / 1048576)} MB per file · ` +
    `card: ${m.card.source}`;
}

function clearPreview(slot) {
  const img = $(slot + "-preview");
  if (img.src) URL.revokeObjectURL(img.src);
  img.hidden = true; img.removeAttribute("src");
  $(slot + "-hint").hidden = false; $(slot + "-clear").hidden = true;
}

async function setFile(slot, file) {
  files[slot] = file;
  const img = $(slot + "-preview"), hint = $(slot + "-hint"), clear = $(slot + "-clear");
  showError("");
  if (!file) { clearPreview(slot); return; }
  const fd = new FormData();
  fd.append("images", file, file.name);
  // Previews come from the server's own image pipeline (DICOM windowing included), not the browser's decoder.
  const resp = await fetch("/v1/preview", { method: "POST", body: fd });
  if (!resp.ok) {
    // A rejected file leaves nothing behind: no earlier preview, no file in the picker; the slot names it once.
    files[slot] = null; clearPreview(slot); $(slot + "-input").value = "";
    showError(`${slot} image: ` + await errorText(resp, false));
    return;
  }
  img.src = URL.createObjectURL(await resp.blob());
  img.hidden = false; hint.hidden = true; clear.hidden = false;
}

function wireDrop(slot) {
  const zone = $(slot + "-drop");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault(); zone.classList.remove("over");
    if (e.dataTransfer.files.length) setFile(slot, e.dataTransfer.files[0]);
  });
  $(slot + "-input").addEventListener("change", (e) => { if (e.target.files.length) setFile(slot, e.target.files[0]); });
  $(slot + "-clear").addEventListener("click", () => { $(slot + "-input").value = ""; setFile(slot, null); });
}

function appendPrior(fd) {
  // The prior study: its frontal image, report and dates (fields the model does not take are left out).
  const takes = $("prior-panel").dataset.takes || "none";
  if (files.prior && (takes === "images" || takes === "both")) {
    fd.append("prior_images", files.prior, files.prior.name); fd.append("prior_views", "PA");
  }
  const report = $("prior_report").value.trim();
  if (report && (takes === "report" || takes === "both")) fd.append("prior_report", report);
  if (fd.has("prior_images") || fd.has("prior_report")) {
    if ($("prior_date").value) fd.append("prior_date", $("prior_date").value);
    if ($("prior_date").value && $("study_date").value) fd.append("study_date", $("study_date").value);
  }
}

function hasPrior() {
  const takes = $("prior-panel").dataset.takes || "none";
  return (files.prior && (takes === "images" || takes === "both"))
    || ($("prior_report").value.trim() && (takes === "report" || takes === "both"));
}

function studyForm(withIndication, withPrior = true) {
  const fd = new FormData();
  if (files.frontal) { fd.append("images", files.frontal, files.frontal.name); fd.append("views", $("frontal-view").value); }
  if (files.lateral) { fd.append("images", files.lateral, files.lateral.name); fd.append("views", "LATERAL"); }
  // Every context slot a template can declare (the server refuses nothing a manifest could carry).
  for (const name of ["indication", "history", "comparison", "age", "sex", "hints"]) {
    const v = $(name).value.trim();
    if (v && (withIndication || name !== "indication")) fd.append(name, v);
  }
  if (withPrior) appendPrior(fd);
  fd.append("template", $("template").value);
  for (const name of ["num_beams", "max_new_tokens", "repetition_penalty"]) {
    if ($(name).value !== "") fd.append(name, $(name).value);
  }
  if ($("do_sample").checked) {
    fd.append("do_sample", "true");
    fd.append("temperature", $("temperature").value);
    fd.append("top_p", $("top_p").value);
  }
  return fd;
}

async function generate(withIndication, withPrior = true) {
  const resp = await fetch("/v1/reports", { method: "POST", body: studyForm(withIndication, withPrior) });
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp.json();
}

function badges(el, findings, diff) {
  el.replaceChildren();
  const add = (obs, cls, label) => {
    const b = document.createElement("span");
    b.className = `badge ${cls}` + (diff && diff.has(obs) ? " diff" : "");
    b.textContent = label ? `${obs}: ${label}` : obs;
    b.dataset.observation = obs;
    el.appendChild(b);
  };
  findings.positive.forEach((o) => add(o, o === "No Finding" ? "clear" : "pos"));
  findings.uncertain.forEach((o) => add(o, "unc", "uncertain"));
  findings.negative.forEach((o) => add(o, "neg", "absent"));
  // A finding one report names and the other does not: show it as "not mentioned" so the difference is visible.
  if (diff) for (const o of diff) if (findings.labels[o] === null) add(o, "none", "not mentioned");
}

function timingText(r) {
  const t = r.timings_ms;
  return `queue ${t.queue} ms · preprocessing ${t.preprocessing} ms · generation ${t.generation} ms ` +
    `(batch of ${r.batch_size}) · total ${t.total} ms`;
}

function busy(on, text) {
  $("generate").disabled = on; $("compare-button").disabled = on;
  $("compare-prior-button").disabled = on || ($("prior-panel").dataset.takes || "none") === "none";
  if (text) $("status").textContent = text;
}

function needImages() {
  if (!files.frontal && !files.lateral) { showError("add at least one image"); return true; }
  return false;
}

async function onGenerate() {
  if (needImages()) return;
  showError(""); busy(true, "generating…");
  try {
    const r = await generate(true);
    $("compare").hidden = true;
    $("report").textContent = r.report;
    badges($("findings"), r.findings);
    $("timings").textContent = timingText(r);
    $("provenance").textContent = JSON.stringify({ id: r.id, model_hash: r.model_hash, code_version: r.code_version,
      template: r.template, views: r.views, prior: r.prior, decoding: r.decoding, prompt: r.prompt,
      warnings: r.warnings }, null, 2);
    $("result").hidden = false;
    $("status").textContent = `report ${r.id}`;
  } catch (e) { showError(e.message); $("status").textContent = "failed"; }
  finally { busy(false); }
}

// Words that describe change against a prior ("new", "increased", "unchanged", "resolved" ...): highlighted in the
// "compare without the prior" view, so what the prior changed in the wording shows at a glance.
const CHANGE_WORDS = /\b(new|newly|increas\w*|decreas\w*|worse\w*|worsen\w*|improv\w*|unchanged|stable|resol\w*|interval|prior|previous\w*|again|persist\w*)\b/gi;

function markChange(el, text) {
  el.replaceChildren();
  let last = 0;
  for (const m of text.matchAll(CHANGE_WORDS)) {
    el.appendChild(document.createTextNode(text.slice(last, m.index)));
    const mark = document.createElement("mark");
    mark.className = "change"; mark.textContent = m[0];
    el.appendChild(mark);
    last = m.index + m[0].length;
  }
  el.appendChild(document.createTextNode(text.slice(last)));
}

async function onComparePrior() {
  if (needImages()) return;
  if (!hasPrior()) { showError("add the prior study (its image or report) first: the comparison leaves it out"); return; }
  showError(""); busy(true, "generating both reports…");
  try {
    const [a, b] = await Promise.all([generate(true, true), generate(true, false)]);
    showCompare(a, b, "the prior");
    markChange($("report-with"), a.report);
    markChange($("report-without"), b.report);
  } catch (e) { showError(e.message); $("status").textContent = "failed"; }
  finally { busy(false); }
}

function showCompare(a, b, what) {
  const diff = new Set(Object.keys(a.findings.labels).filter((o) => a.findings.labels[o] !== b.findings.labels[o]));
  $("compare-with-head").textContent = `With ${what}`;
  $("compare-without-head").textContent = `Without ${what}`;
  $("report-with").textContent = a.report;
  $("report-without").textContent = b.report;
  badges($("findings-with"), a.findings, diff);
  badges($("findings-without"), b.findings, diff);
  const parts = [...diff].map((o) => `${o} (${VALUE_NAME[String(a.findings.labels[o])]} with, ` +
    `${VALUE_NAME[String(b.findings.labels[o])]} without)`);
  $("compare-summary").textContent = parts.length ? `Findings that change with ${what}: ` + parts.join("; ")
    : `${what[0].toUpperCase() + what.slice(1)} does not change any labeled finding for this study.`;
  $("compare").hidden = false; $("result").hidden = true;
  $("status").textContent = `reports ${a.id} and ${b.id}`;
}

async function onCompare() {
  if (needImages()) return;
  if (!$("indication").value.trim()) { showError("type an indication first: the comparison leaves it out"); return; }
  showError(""); busy(true, "generating both reports…");
  try {
    // Sent together, so the server batches them into one generate call.
    const [a, b] = await Promise.all([generate(true), generate(false)]);
    showCompare(a, b, "the indication");
  } catch (e) { showError(e.message); $("status").textContent = "failed"; }
  finally { busy(false); }
}

document.addEventListener("DOMContentLoaded", () => {
  wireDrop("frontal"); wireDrop("lateral"); wireDrop("prior");
  $("do_sample").addEventListener("change", (e) => {
    $("temperature").disabled = $("top_p").disabled = !e.target.checked;
    $("num_beams").disabled = e.target.checked;
    if (e.target.checked) $("num_beams").value = 1;
  });
  $("generate").addEventListener("click", onGenerate);
  $("compare-button").addEventListener("click", onCompare);
  $("compare-prior-button").addEventListener("click", onComparePrior);
  loadModel().catch((e) => showError(e.message));
});
