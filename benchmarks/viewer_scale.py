"""Case viewer at MIMIC-CXR test size: build the page for 3,800 studies and time it in headless Chromium.

    python benchmarks/viewer_scale.py [--n 3800] [--image-size 64]

Synthetic studies (frontal + lateral views; predictions = the next study's report, so every badge kind occurs),
scored and written with `clinicalblip eval --html` (METEOR skipped: this measures the page). Then Debian's
chromium (/usr/bin/chromium, via Playwright) opens the file and the benchmark times: load until the first page of
rows is shown, a label x error-type filter, a text search, a sort, and turning pages (each from the event to the
rows being painted, and the JavaScript part alone: filter + sort + building the page's HTML). Prints a table and writes viewer_scale.json to $OUT (or ./runs/).
Target: every interaction well under 100 ms; only one page of rows (50 by default) is ever in the DOM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from clinicalblip import cli
from clinicalblip.data.manifest import read_manifest
from clinicalblip.data.synth import write_synthetic_dataset

CHROMIUM = os.environ.get("CLINICALBLIP_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

# Runs inside the page: performs an action, then waits two animation frames (layout and paint done).
_TIMED = """async (action) => {
  const t0 = performance.now();
  const el = (s) => document.querySelector(s);
  const set = (s, v, ev) => { el(s).value = v; el(s).dispatchEvent(new Event(ev)); };
  if (action === 'filter') { set('#f-label', '2', 'change'); set('#f-err', 'fn', 'change'); }
  if (action === 'clear') el('#f-clear').click();
  if (action === 'sort') set('#f-sort', 'rouge_asc', 'change');
  if (action === 'next') el('#next').click();
  if (action === 'size200') set('#f-size', '200', 'change');
  const js = performance.now() - t0;  // the handlers run synchronously: filter, sort, build the page's HTML
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  return [performance.now() - t0, js, document.querySelectorAll('.case').length];
}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3800)
    ap.add_argument("--image-size", type=int, default=64)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        manifest = write_synthetic_dataset(tmp / "data", n=args.n, seed=0, image_size=args.image_size)
        recs = read_manifest(manifest, resolve_paths=False)
        t_data = time.perf_counter() - t
        preds = tmp / "preds.jsonl"
        with preds.open("w", encoding="utf-8") as fh:
            for i, r in enumerate(recs):
                nxt = recs[(i + 1) % len(recs)]
                fh.write(json.dumps({"id": r["id"], "prediction": nxt["findings"], "reference": r["findings"],
                                     "dataset": "synthetic", "labels": r["labels"]}) + "\n")
        html = tmp / "report.html"
        t = time.perf_counter()
        assert cli.main(["eval", str(preds), "--out", str(tmp / "metrics.json"), "--html", str(html), "--manifest",
                         str(manifest), "--skip-java-metrics", "--no-report"]) == 0
        t_build = time.perf_counter() - t
        size_mb = html.stat().st_size / 2**20

        timings = {}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            t = time.perf_counter()
            page.goto(html.as_uri())
            page.wait_for_selector(".case")
            timings["load_to_first_rows_ms"] = (time.perf_counter() - t) * 1000
            shown = int(page.text_content("#case-count"))
            for action in ("filter", "clear", "sort", "next", "size200"):
                ms, js, rows = page.evaluate(_TIMED, action)
                timings[f"{action}_ms"] = ms
                timings[f"{action}_js_ms"] = js
                timings[f"{action}_rows_in_dom"] = rows
            # search: the input is debounced 120 ms; time from typing to the rows, minus nothing (the user's view)
            t = time.perf_counter()
            page.fill("#f-q", "pneumothorax")
            page.wait_for_function(f"document.querySelector('#case-count').textContent != '{shown}'")
            timings["search_incl_120ms_debounce_ms"] = (time.perf_counter() - t) * 1000
            browser.close()
    out = {
        "benchmark": "viewer_scale", "studies": args.n, "views": sum(len(r["images"]) for r in recs),
        "cases_shown": shown, "html_mb": round(size_mb, 1), "seconds_synth_data": round(t_data, 1),
        "seconds_eval_and_page": round(t_build, 1), **{k: round(v, 1) for k, v in timings.items()},
        "js_errors": errors, "python": platform.python_version(), "cpus": os.cpu_count(),
    }
    out_dir = Path(os.environ.get("OUT") or "runs")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "viewer_scale.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'step':<44}{'value':>10}")
    for k in ("studies", "views", "cases_shown", "html_mb", "seconds_eval_and_page", "load_to_first_rows_ms",
              "filter_ms", "filter_js_ms", "clear_ms", "clear_js_ms", "sort_ms", "sort_js_ms", "next_ms",
              "next_js_ms", "size200_ms", "size200_js_ms", "size200_rows_in_dom", "search_incl_120ms_debounce_ms"):
        print(f"{k:<44}{out[k]:>10}")
    print(f"viewer_scale: {args.n} studies, {size_mb:.1f} MB page -> {out_dir / 'viewer_scale.json'}")


if __name__ == "__main__":
    main()
