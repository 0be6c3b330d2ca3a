"""`clinicalblip compare`: paired differences, bootstrap CIs and permutation p-values on corpus-level metrics
recomputed from per-study sufficient statistics, checked against pycocoevalcap / the METEOR jar / `eval`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clinicalblip import cli
from clinicalblip.data.manifest import read_manifest
from clinicalblip.metrics import nlg
from clinicalblip.metrics.casestats import build_case_stats, metrics_from_sums
from clinicalblip.metrics.compare import compare_files, holm, paired_resampling
from clinicalblip.metrics.nlg import nlg_with_case_stats

NLG = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
needs_java = pytest.mark.skipif(not nlg.java_available(), reason="Java is not installed (METEOR)")


def _write(path: Path, records, predictions) -> Path:
    rows = [{"id": r["id"], "prediction": p, "reference": r["findings"], "dataset": "synthetic", "labels": r["labels"]}
            for r, p in zip(records, predictions)]
    path.write_text("".join(json.dumps(x) + "\n" for x in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def systems(tmp_path_factory, synth_manifest):
    """Synthetic studies and four systems: perfect (= references), a constant normal report, 'shifted' (each study
    gets the next study's report) and 'shifted' changed on one study only."""
    d = tmp_path_factory.mktemp("compare")
    recs = read_manifest(synth_manifest, resolve_paths=False)
    refs = [r["findings"] for r in recs]
    normal = next(r["findings"] for r in recs if not any(r["labels"].values()))
    shifted = refs[1:] + refs[:1]
    one = list(shifted)
    one[7] = refs[7]
    return {
        "recs": recs, "dir": d,
        "perfect": _write(d / "perfect.jsonl", recs, refs),
        "constant": _write(d / "constant.jsonl", recs, [normal] * len(recs)),
        "shifted": _write(d / "shifted.jsonl", recs, shifted),
        "one": _write(d / "one.jsonl", recs, one),
    }


def _run(paths, **kw):
    kw.setdefault("skip_java_metrics", True)
    kw.setdefault("resamples", 2000)
    return compare_files([str(p) for p in paths], **kw)


def test_system_against_itself_differs_by_zero_with_p_one(systems):
    res = _run([systems["shifted"], systems["shifted"]])
    block = res["comparisons"][0]["metrics"]
    assert "BLEU_4" in block and "CIDEr" in block and "f1/pneumothorax" in block and "clinical_micro_f1" in block
    for k, m in block.items():
        assert m["diff"] == 0 and m["ci95"] == [0.0, 0.0] and m["p"] == 1.0, k


def test_differing_on_one_study_is_not_significant(systems):
    res = _run([systems["shifted"], systems["one"]])
    block = res["comparisons"][0]["metrics"]
    assert block["ROUGE_L"]["diff"] > 0 and block["BLEU_4"]["diff"] > 0  # study 7 became perfect
    for k, m in block.items():
        assert m["p"] > 0.5, (k, m)
    assert res["disagreements"] == [] or all(d["id"] == systems["recs"][7]["id"] for d in res["disagreements"])


def test_intervals_and_p_values_reproducible_with_a_seed(systems):
    a = _run([systems["constant"], systems["shifted"]], seed=11, resamples=500)
    b = _run([systems["constant"], systems["shifted"]], seed=11, resamples=500)
    c = _run([systems["constant"], systems["shifted"]], seed=12, resamples=500)
    get = lambda r: {k: (m["ci95"], m["p"]) for k, m in r["comparisons"][0]["metrics"].items()}  # noqa: E731
    assert get(a) == get(b)
    assert get(a) != get(c)
    lo, hi = a["comparisons"][0]["metrics"]["ROUGE_L"]["ci95"]
    assert lo < a["comparisons"][0]["metrics"]["ROUGE_L"]["diff"] < hi


def test_known_large_gap_is_significant(systems):
    res = _run([systems["constant"], systems["perfect"]])
    block = res["comparisons"][0]["metrics"]
    assert block["clinical_macro_f1"]["a"] == 0.0 and block["clinical_macro_f1"]["b"] == 1.0
    assert block["clinical_macro_f1"]["p"] < 0.001 and block["clinical_micro_f1"]["p"] < 0.001
    assert block["clinical_macro_f1"]["ci95"][0] > 0.5 and block["clinical_macro_f1"]["significant"]
    assert block["BLEU_4"]["p"] < 0.001 and block["BLEU_4"]["diff"] > 0.5
    # the page lists the studies where the findings disagree, every abnormal one
    abnormal = {r["id"] for r in systems["recs"] if any(r["labels"].values())}
    assert {d["id"] for d in res["disagreements"]} == abnormal


@needs_java
def test_point_estimates_equal_eval_exactly(systems, tmp_path, capsys):
    paths = [systems["constant"], systems["shifted"], systems["perfect"]]
    evals = []
    for p in paths:
        out = tmp_path / f"{p.stem}.json"
        assert cli.main(["eval", str(p), "--out", str(out), "--bootstrap", "0", "--no-report"]) == 0
        evals.append(json.loads(out.read_text()))
    out = tmp_path / "compare.json"
    html = tmp_path / "compare.html"
    assert cli.main(["compare", *map(str, paths), "--out", str(out), "--resamples", "300", "--html", str(html)]) == 0
    printed = capsys.readouterr().out
    assert "shifted  vs  constant" in printed and "p_holm" in printed and "METEOR" in printed
    res = json.loads(out.read_text())
    for sys_, m in zip(res["systems"], evals):
        for k in NLG + ("clinical_macro_f1",):
            assert sys_["metrics"][k] == m[k], k  # exactly, not approximately
        assert sys_["metrics"]["clinical_micro_f1"] == m["clinical"]["micro"]["f1"]
        for o, b in m["clinical"]["per_label"].items():
            assert sys_["metrics"][f"f1/{o}"] == b["f1"]
    for j, c in enumerate(res["comparisons"], start=1):
        for k in NLG + ("clinical_macro_f1",):
            assert c["metrics"][k]["diff"] == evals[j][k] - evals[0][k]
            # the statistics-based recomputation agrees with the scorers themselves
            assert c["metrics"][k]["diff_from_statistics"] == pytest.approx(c["metrics"][k]["diff"], abs=1e-12)
            assert c["metrics"][k]["p_holm"] >= c["metrics"][k]["p"]
    assert [c["b"] for c in res["comparisons"]] == ["shifted", "perfect"]
    assert "disagree most" in html.read_text()


@needs_java
def test_resampled_statistics_equal_the_scorers_on_the_resampled_corpus(systems):
    """A bootstrap resample and a permutation swap, rebuilt as explicit corpora and scored by pycocoevalcap and
    the METEOR jar, give the statistics-based values (CIDEr: exactly under the swap; under the bootstrap the
    fixed document frequencies are the documented approximation)."""
    recs = systems["recs"]
    refs = [r["findings"] for r in recs]
    a = [r["findings"] for r in recs[3:] + recs[:3]]
    b = [r["findings"] for r in recs[1:] + recs[:1]]
    n = len(refs)
    none = np.zeros((n, 1), bool)

    def stats(preds):
        _, cases = nlg_with_case_stats(refs, preds)
        s = build_case_stats(range(n), cases, none, none, ["x"], {})
        return s, *s.matrix()

    sa, xa, where = stats(a)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, n, n)
    w = np.bincount(idx, minlength=n).astype(float)
    from_stats = metrics_from_sums(w @ xa, where, sa)
    direct = nlg.compute_nlg([refs[i] for i in idx], [a[i] for i in idx])
    for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L"):
        assert float(from_stats[k]) == pytest.approx(direct[k], rel=1e-12, abs=1e-15), k
    swap = rng.integers(0, 2, n).astype(bool)
    mixed = [bi if s else ai for ai, bi, s in zip(a, b, swap)]
    _, xb, _ = stats(b)
    swapped = metrics_from_sums(xa.sum(0) + swap.astype(float) @ (xb - xa), where, sa)
    direct = nlg.compute_nlg(refs, mixed)
    for k in NLG:
        assert float(swapped[k]) == pytest.approx(direct[k], rel=1e-12, abs=1e-15), k


def test_holm():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # 2 x 0.8 capped at 1, then monotone


def test_three_systems_are_holm_corrected(systems):
    res = _run([systems["constant"], systems["shifted"], systems["perfect"]], resamples=300)
    assert len(res["comparisons"]) == 2
    for k in res["metrics"]:
        ps = [c["metrics"][k]["p"] for c in res["comparisons"]]
        assert [c["metrics"][k]["p_holm"] for c in res["comparisons"]] == pytest.approx(holm(ps))


def test_refuses_different_references_and_small_overlap(systems, tmp_path, capsys):
    recs = systems["recs"]
    changed = [dict(r) for r in recs]
    changed[4]["findings"] = "Something else entirely."
    other = _write(tmp_path / "other_refs.jsonl", changed, [r["findings"] for r in recs])
    assert cli.main(["compare", str(systems["perfect"]), str(other), "--out", str(tmp_path / "c.json"),
                     "--skip-java-metrics", "--resamples", "10"]) == 2
    err = capsys.readouterr().err
    assert f"1 of {len(recs)} shared studies have different references" in err and recs[4]["id"] in err
    half = _write(tmp_path / "half.jsonl", recs[: len(recs) // 2], [r["findings"] for r in recs[: len(recs) // 2]])
    assert cli.main(["compare", str(systems["perfect"]), str(half), "--out", str(tmp_path / "c.json"),
                     "--skip-java-metrics", "--resamples", "10"]) == 2
    err = capsys.readouterr().err
    assert f"share {len(recs) // 2} studies" in err and f"perfect: {len(recs)}" in err and "--min-overlap" in err
    # allowed with a lower threshold: the shared half is compared
    res = _run([systems["perfect"], half], min_overlap=0.4, resamples=10)
    assert res["shared"] == len(recs) // 2 and res["comparisons"][0]["metrics"]["BLEU_4"]["diff"] == 0
    assert cli.main(["compare", str(systems["perfect"]), "--out", str(tmp_path / "c.json")]) == 2


def test_paired_resampling_direct(systems):
    """The core on hand-made statistics: a study-level gap on one label gives the textbook numbers."""
    n = 30
    y = np.zeros((n, 1), bool)
    y[:10] = True
    pa = np.zeros((n, 1), bool)
    pb = y.copy()
    cases = {"rouge_l": [0.5] * n}
    a = build_case_stats(range(n), cases, y, pa, ["f"], {"micro": ["f"]})
    b = build_case_stats(range(n), cases, y, pb, ["f"], {"micro": ["f"]})
    (res,) = paired_resampling(a, [b], resamples=20000, seed=0)
    # |d*| >= 1 only when all ten positive studies are swapped or none is: exact p = 2 / 2**10
    assert res["clinical_macro_f1"]["diff"] == 1.0 and abs(res["clinical_macro_f1"]["p"] - 2 / 1024) < 0.0012
    # bootstrap: B is perfect on every resample with a positive study, A never is
    assert res["clinical_macro_f1"]["ci95"] == [1.0, 1.0]
    assert res["ROUGE_L"]["diff"] == 0 and res["ROUGE_L"]["p"] == 1.0 and res["ROUGE_L"]["ci95"] == [0.0, 0.0]


def test_compare_page_links_into_each_viewer(systems, tmp_path):
    from clinicalblip.viewer import write_compare_html

    res = _run([systems["constant"], systems["perfect"]], resamples=50)
    (tmp_path / "views").mkdir()
    page = write_compare_html(res, tmp_path / "out" / "compare.html",
                              [tmp_path / "views" / "constant.html", tmp_path / "views" / "perfect.html"])
    text = page.read_text()
    first = res["disagreements"][0]["id"]
    assert f"href='../views/constant.html#case={first}'" in text and f"href='../views/perfect.html#case={first}'" in text
    assert text.count("open in viewer") == 2 * len(res["disagreements"])


def test_ablation_table_carries_the_paired_tests(systems, tmp_path):
    from clinicalblip import demo

    d = tmp_path / "eval"
    d.mkdir()
    recs = systems["recs"]
    almost = [r["findings"] for r in recs]
    almost[7] = recs[8]["findings"]
    files = {"real": systems["perfect"], "none": _write(tmp_path / "almost.jsonl", recs, almost),
             "generic": systems["constant"]}
    for mode, path in files.items():
        assert cli.main(["eval", str(path), "--out", str(d / f"metrics_{mode}.json"), "--skip-java-metrics",
                         "--bootstrap", "0", "--no-report"]) == 0
    assert cli.main(["compare", *map(str, files.values()), "--names", *files, "--out", str(d / "compare.json"),
                     "--skip-java-metrics", "--resamples", "2000"]) == 0
    table = demo.ablations(str(d))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "clinical_macro_f1 vs real (95% CI, p)" in rows["ablation"]
    assert rows["trained (real context)"].rstrip().endswith("|  |  |")  # the baseline has no test against itself
    assert " n.s. |" in rows["no indication"]  # one study differs: not significant
    assert "p=0.0010 |" in rows["generic indication"] and "n.s." not in rows["generic indication"]
    assert (d / "ablations.md").read_text().count("n.s.") >= 1


@pytest.mark.parametrize("rows, needle", [
    ([{"prediction": "a", "reference": "b"}], "has no 'id'"),
    ([{"id": 1, "prediction": "a", "reference": "b"}, {"id": 1, "prediction": "c", "reference": "b"}],
     "id '1' appears twice"),
])
def test_bad_files_are_one_clear_line(tmp_path, capsys, rows, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["compare", str(bad), str(bad), "--out", str(tmp_path / "c.json"), "--skip-java-metrics"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------- named conventions
def test_rule_labeler_conventions_are_compared_and_equal_eval(systems):
    """With the rule labeler, every ``rules_*`` micro / macro / example key gets a paired test whose point estimates
    are eval's and whose statistics-based difference is the eval difference."""
    from clinicalblip.metrics.conventions import convention_keys
    from clinicalblip.metrics.evaluate_predictions import evaluate_records, read_predictions

    res = _run([systems["constant"], systems["shifted"]], labeler="chexpert", resamples=300)
    block = res["comparisons"][0]["metrics"]
    assert set(convention_keys("rules")) <= set(block)
    evals = []
    for p in (systems["constant"], systems["shifted"]):
        m, _ = evaluate_records(read_predictions(p)[0], "r2gen", "chexpert", bootstrap=0, skip_java_metrics=True)
        evals.append(m)
    moved = 0
    for k in convention_keys("rules"):
        assert block[k]["a"] == evals[0][k] and block[k]["b"] == evals[1][k], k
        assert block[k]["diff_from_statistics"] == pytest.approx(block[k]["diff"], abs=1e-12), k
        lo, hi = block[k]["ci95"]
        assert lo <= block[k]["diff"] + 1e-12 and block[k]["diff"] - 1e-12 <= hi and 0 < block[k]["p"] <= 1, k
        moved += block[k]["diff"] != 0
    assert moved >= 4  # the constant normal report and the shifted reports do differ on findings
    same = _run([systems["shifted"], systems["shifted"]], labeler="chexpert", resamples=50)["comparisons"][0]
    for k in convention_keys("rules"):
        assert same["metrics"][k]["diff"] == 0 and same["metrics"][k]["ci95"] == [0.0, 0.0], k


def test_convention_statistics_equal_the_scores_of_a_resampled_corpus():
    """A bootstrap resample (duplicated studies) and a permutation swap, scored as explicit corpora by
    ``convention_scores``, give the values recomputed from the summed per-case counts, to the last bits."""
    from clinicalblip.metrics.casestats import convention_blocks
    from clinicalblip.metrics.conventions import convention_scores
    from clinicalblip.metrics.labeler import OBSERVATIONS

    rng = np.random.default_rng(5)
    n = 40

    def rows():
        return [{o: [1, 0, -1, None][int(v)] for o, v in zip(OBSERVATIONS, rng.integers(0, 4, len(OBSERVATIONS)))}
                for _ in range(n)]

    ref, a, b = rows(), rows(), rows()
    none = np.zeros((n, 1), bool)

    def stats(pred):
        s = build_case_stats(range(n), {}, none, none, ["x"], {})
        s.blocks.update(convention_blocks(ref, pred, "rules"))
        return s, *s.matrix()

    sa, xa, where = stats(a)
    _, xb, _ = stats(b)
    assert {k: float(v) for k, v in metrics_from_sums(xa.sum(0), where, sa).items()
            if k.startswith("rules_")} == pytest.approx(convention_scores(ref, a, "rules"), abs=1e-15)
    idx = rng.integers(0, n, n)
    w = np.bincount(idx, minlength=n).astype(float)
    got = metrics_from_sums(w @ xa, where, sa)
    want = convention_scores([ref[i] for i in idx], [a[i] for i in idx], "rules")
    for k, v in want.items():
        assert float(got[k]) == pytest.approx(v, abs=1e-12), k
    swap = rng.integers(0, 2, n).astype(bool)
    got = metrics_from_sums(xa.sum(0) + swap.astype(float) @ (xb - xa), where, sa)
    want = convention_scores(ref, [bi if s else ai for ai, bi, s in zip(a, b, swap)], "rules")
    for k, v in want.items():
        assert float(got[k]) == pytest.approx(v, abs=1e-12), k
