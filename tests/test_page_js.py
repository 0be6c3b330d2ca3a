"""The page's image slots, run in Node against the server's real /v1/preview answers (issue 24 item 15): a rejected
image clears the slot's earlier preview, and the error is said once. (test_serve_browser.py runs the same in a real
Chromium where one is installed; this runs wherever `node` is.)"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from importlib.resources import files

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from clinicalblip.generate import ReportModel  # noqa: E402
from clinicalblip.model import build_base  # noqa: E402
from clinicalblip.prompts import load_template  # noqa: E402
from clinicalblip.serve.app import create_app  # noqa: E402
from clinicalblip.serve.engine import ReportService  # noqa: E402

NODE = shutil.which("node")

# Minimal DOM + fetch for app.js: elements by id with hidden/src/value/textContent, fetch answering from a queue.
HARNESS = r"""
const fs = require("fs"), vm = require("vm");
const els = {};
function el(id) {
  if (!els[id]) els[id] = { id, hidden: false, textContent: "", value: "", src: "", dataset: {}, files: [],
    removeAttribute(a) { if (a === "src") this.src = ""; }, addEventListener() {} };
  return els[id];
}
const answers = JSON.parse(process.argv[3]);
let i = 0;
const ctx = { document: { getElementById: el, addEventListener() {} }, console, URL, FormData, Blob, Response,
  fetch: async () => { const a = answers[i++];
    return new Response(a.body_b64 ? Buffer.from(a.body_b64, "base64") : a.text, { status: a.status }); } };
vm.createContext(ctx);
vm.runInContext(fs.readFileSync(process.argv[2], "utf8"), ctx);
(async () => {
  const file = (name) => Object.assign(new Blob(["x"]), { name });
  el("frontal-input").value = "C:\\fakepath\\good.png";
  await ctx.setFile("frontal", file("good.png"));
  const after_good = { preview_hidden: el("frontal-preview").hidden, src: el("frontal-preview").src };
  el("frontal-input").value = "C:\\fakepath\\scan.png";
  await ctx.setFile("frontal", file("scan.png"));
  // every context slot of the templates goes into the study form (issue 24 item 7)
  for (const [k, v] of Object.entries({ indication: "Cough.", age: "63", sex: "F", hints: "effusion, edema" })) {
    el(k).value = v;
  }
  const form = [...ctx.studyForm(true).entries()].filter(([k]) => typeof k === "string").map(([k, v]) => [k, v]);
  console.log(JSON.stringify({ after_good, form, preview_hidden: el("frontal-preview").hidden,
    src: el("frontal-preview").src, hint_hidden: el("frontal-hint").hidden, clear_hidden: el("frontal-clear").hidden,
    input: el("frontal-input").value, error: el("error").textContent, error_hidden: el("error").hidden }));
})();
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_a_rejected_image_clears_the_preview_and_says_its_error_once(tmp_path):
    import base64

    model, processor = build_base("tiny")
    rm = ReportModel(model=model.eval(), processor=processor, template=load_template("findings_with_context"),
                     model_dir=str(tmp_path))
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(buf, format="PNG")
    with TestClient(create_app(ReportService(rm))) as client:
        good = client.post("/v1/preview", files=[("images", ("good.png", buf.getvalue(), "image/png"))])
        bad = client.post("/v1/preview", files=[("images", ("scan.png", b"not a picture at all" * 10, "image/png"))])
    assert good.status_code == 200 and bad.status_code == 422
    answers = [{"status": 200, "body_b64": base64.b64encode(good.content).decode()},
               {"status": 422, "text": bad.text}]
    (tmp_path / "h.js").write_text(HARNESS)
    app_js = str(files("clinicalblip.serve") / "static" / "app.js")
    out = subprocess.run([NODE, str(tmp_path / "h.js"), app_js, json.dumps(answers)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["after_good"] == {"preview_hidden": False, "src": state["after_good"]["src"]}
    assert state["after_good"]["src"].startswith("blob:")
    # the rejected file leaves nothing behind: no old preview, no file in the picker, the drop hint back
    assert state["preview_hidden"] and state["src"] == "" and not state["hint_hidden"] and state["clear_hidden"]
    assert state["input"] == ""
    assert not state["error_hidden"]
    err = state["error"]
    assert err == "frontal image: cannot decode image: not a PNG, JPEG, DICOM or other known image format (HTTP 422)"
    form = dict((k, v) for k, v in state["form"] if isinstance(v, str))
    assert {k: form.get(k) for k in ("indication", "age", "sex", "hints")} == {
        "indication": "Cough.", "age": "63", "sex": "F", "hints": "effusion, edema"}
