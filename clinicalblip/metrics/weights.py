"""The weights folder of the neural metrics: what it holds, how to fetch it, how to check it, how eval finds files.

Layout of DIR (``clinicalblip metrics fetch --to DIR`` writes it; ``eval --metrics-dir DIR`` reads only from it):

    chexbert/chexbert.pth              CheXbert (Smit et al. 2020), hub StanfordAIMI/RRG_scorers
    bert-base-uncased/                 CheXbert's encoder config + tokenizer (google-bert/bert-base-uncased)
    radgraph/radgraph.tar.gz           RadGraph (Jain et al. 2021) DyGIE++ archive, StanfordAIMI/RRG_scorers
    radgraph/radgraph-xl.tar.gz        RadGraph-XL (Delbrouck et al. 2024), StanfordAIMI/RRG_scorers
    distilroberta-base/                BERTScore encoder of ReXrank / RadCliQ (distilbert/distilroberta-base)
    distilbert-base-uncased/           BERTScore encoder of RadEval (distilbert/distilbert-base-uncased)
    SHA256SUMS                         written by fetch: the hash of every file as downloaded
    parity.json                        written by ``metrics parity`` when our numbers matched the reference packages

BERTScore's rescale baseline for distilroberta-base (bert_score's ``rescale_baseline/en/distilroberta-base.tsv``)
is not downloaded: its numbers ship as constants in ``neural.py`` (``DISTILROBERTA_BASELINE``, with their source).

Hashes and revisions: ``FILES`` records a file's sha256 and the hub commit to fetch it at only where a public source
states them (the source is named in a comment next to each value; this checkout was written without hub access, so
none was read from the hub itself). Where no source was found the value is ``None``: the hash is UNKNOWN (never
invented) and ``metrics check`` checks that file against ``SHA256SUMS`` (the hash fetch saw) instead; the revision is
UNPINNED and fetch takes the hub's default branch and writes the commit it resolved into ``fetch.json``. A recorded
hash is enforced: fetch refuses a download whose sha256 differs, and check reports the file DIFFERENT.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from clinicalblip.errors import UserError

FETCH_HINT = "clinicalblip metrics fetch --to {dir}"


@dataclass(frozen=True)
class WeightFile:
    path: str  # inside DIR
    repo: str  # hub repository
    filename: str  # inside the hub repository
    revision: str | None = None  # hub commit; None = UNPINNED (unknown offline)
    sha256: str | None = None  # None = UNKNOWN (not recorded; never invented)


_RRG = "StanfordAIMI/RRG_scorers"
# StanfordAIMI/RRG_scorers@6646433b3ad83a10f6e141db76d0ece44312b236 with chexbert.pth sha256 6550703c...: pinned
# together (CHEXBERT_CHECKPOINT_REVISION / CHEXBERT_CHECKPOINT_SHA256) in third-party GitHub code found through the
# code index; the same sha256 (1,314,414,442 bytes) is recorded by at least eight independent public repositories.
# Not read from https://huggingface.co/StanfordAIMI/RRG_scorers/blob/main/chexbert.pth (no hub access here).
_CHEXBERT_REV = "6646433b3ad83a10f6e141db76d0ece44312b236"
_CHEXBERT_SHA = "6550703c92d640e1e04d8105a7a185d76ece0f25fcbf033d292785bf22c0fde1"
# radgraph.tar.gz at RRG_scorers@d97745aa...: the revision an ``F1RadGraphv2._download_radgraph`` wrapper of the
# radgraph package pins in hf_hub_download (the same code in five public repositories found through the code index;
# its original repository was not identified). Its sha256 was found nowhere: UNKNOWN.
_RADGRAPH_REV = "d97745aa136e5beb927da7e768e99de6ae807902"
# google-bert/bert-base-uncased (the old id bert-base-uncased redirects there): vocab.txt pinned as
# https://huggingface.co/bert-base-uncased/resolve/86b5e0934494bd15c9632b12f734a8a67f723594/vocab.txt with sha256
# 07eced37... (third-party Bazel-style pin; the same hash, 231,508 bytes, is recorded by many repositories).
# config.json 7160e155... (570 bytes) is recorded by two third-party repositories; tokenizer_config.json a025160e...
# by one (both alongside the chexbert.pth hash above, pinning CheXbert's encoder files); a025160e... is the sha256 of
# the 48 bytes '{"do_lower_case": true, "model_max_length": 512}' (checked here), that file's published content.
_BERT_REV = "86b5e0934494bd15c9632b12f734a8a67f723594"
_BERT = "google-bert/bert-base-uncased"
FILES: tuple[WeightFile, ...] = (
    WeightFile("chexbert/chexbert.pth", _RRG, "chexbert.pth", _CHEXBERT_REV, _CHEXBERT_SHA),
    WeightFile("bert-base-uncased/config.json", _BERT, "config.json", _BERT_REV,
               "7160e1553ad2ca51d8c1cb066be533db31826e12d173824c1bb0cb1a4f187d20"),
    WeightFile("bert-base-uncased/vocab.txt", _BERT, "vocab.txt", _BERT_REV,
               "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
    WeightFile("bert-base-uncased/tokenizer_config.json", _BERT, "tokenizer_config.json", _BERT_REV,
               "a025160ef0431f1a392f6f050c1310f4c5d9fb6f275932dbccba73c4d214bf10"),
    WeightFile("radgraph/radgraph.tar.gz", _RRG, "radgraph.tar.gz", _RADGRAPH_REV),
    # radgraph-xl.tar.gz: neither a revision nor a sha256 was found in a public source (UNPINNED, UNKNOWN).
    WeightFile("radgraph/radgraph-xl.tar.gz", _RRG, "radgraph-xl.tar.gz"),
    # The BERT each archive embeds with: its config.json names it (model.embedder.token_embedders.bert.model_name);
    # fetch reads the name from the downloaded archive ("archive:" repos), so nothing is guessed here.
    WeightFile("radgraph/radgraph-encoder/config.json", "archive:radgraph/radgraph.tar.gz", "config.json"),
    WeightFile("radgraph/radgraph-encoder/vocab.txt", "archive:radgraph/radgraph.tar.gz", "vocab.txt"),
    WeightFile("radgraph/radgraph-xl-encoder/config.json", "archive:radgraph/radgraph-xl.tar.gz", "config.json"),
    WeightFile("radgraph/radgraph-xl-encoder/vocab.txt", "archive:radgraph/radgraph-xl.tar.gz", "vocab.txt"),
    # distilroberta-base / distilbert-base-uncased: no published sha256 or revision found (UNKNOWN, UNPINNED).
    WeightFile("distilroberta-base/config.json", "distilbert/distilroberta-base", "config.json"),
    WeightFile("distilroberta-base/model.safetensors", "distilbert/distilroberta-base", "model.safetensors"),
    WeightFile("distilroberta-base/vocab.json", "distilbert/distilroberta-base", "vocab.json"),
    WeightFile("distilroberta-base/merges.txt", "distilbert/distilroberta-base", "merges.txt"),
    WeightFile("distilbert-base-uncased/config.json", "distilbert/distilbert-base-uncased", "config.json"),
    WeightFile("distilbert-base-uncased/model.safetensors", "distilbert/distilbert-base-uncased", "model.safetensors"),
    WeightFile("distilbert-base-uncased/vocab.txt", "distilbert/distilbert-base-uncased", "vocab.txt"),
    WeightFile("distilbert-base-uncased/tokenizer_config.json", "distilbert/distilbert-base-uncased",
               "tokenizer_config.json"),
)

# What each metric of ``eval --metrics`` reads from DIR.
_CHEXBERT = ("chexbert/chexbert.pth", "bert-base-uncased/config.json", "bert-base-uncased/vocab.txt")
_ROBERTA = ("distilroberta-base/config.json", "distilroberta-base/model.safetensors", "distilroberta-base/vocab.json",
            "distilroberta-base/merges.txt")
_DISTILBERT = ("distilbert-base-uncased/config.json", "distilbert-base-uncased/model.safetensors",
               "distilbert-base-uncased/vocab.txt")
METRIC_FILES: dict[str, tuple[str, ...]] = {
    "chexbert": _CHEXBERT,
    "sembscore": _CHEXBERT,
    "bertscore": _ROBERTA,
    "bertscore-radeval": _DISTILBERT,
    "radgraph": ("radgraph/radgraph.tar.gz", "radgraph/radgraph-encoder/config.json",
                 "radgraph/radgraph-encoder/vocab.txt"),
    "radgraph-xl": ("radgraph/radgraph-xl.tar.gz", "radgraph/radgraph-xl-encoder/config.json",
                    "radgraph/radgraph-xl-encoder/vocab.txt"),
    "radcliq": _CHEXBERT + _ROBERTA + ("radgraph/radgraph.tar.gz", "radgraph/radgraph-encoder/config.json",
                                       "radgraph/radgraph-encoder/vocab.txt"),
}
# ReXrank's column set: BLEU-2 (always computed), BERTScore, SembScore, RadGraph (ent+rel)/2 and 1/RadCliQ-v1.
METRIC_GROUPS = {"rexrank": ("bertscore", "sembscore", "radgraph", "radcliq")}
METRIC_CHOICES = tuple(METRIC_FILES) + tuple(METRIC_GROUPS)


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    """``"chexbert,rexrank"`` -> the metric names in order, groups expanded; unknown names are a UserError."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out: list[str] = []
    for name in names:
        if name not in METRIC_CHOICES:
            raise UserError(f"unknown metric {name!r}; choose from {', '.join(METRIC_CHOICES)}")
        for m in METRIC_GROUPS.get(name, (name,)):
            if m not in out:
                out.append(m)
    return out


def require(metrics_dir: str | Path | None, metrics: Iterable[str]) -> Path:
    """The folder, after checking every file the metrics need is there; a missing one is one clear UserError."""
    names = list(metrics)
    if metrics_dir is None:
        raise UserError(f"--metrics {','.join(names)} needs --metrics-dir DIR (fetch it once with "
                        f"`{FETCH_HINT.format(dir='DIR')}`)")
    root = Path(metrics_dir)
    for m in names:
        for rel in METRIC_FILES[m]:
            if not (root / rel).is_file():
                raise UserError(f"metric {m} needs {root / rel}, which is missing; download the weights with "
                                f"`{FETCH_HINT.format(dir=root)}` (on a machine that can reach the hub)")
    return root


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_sums(root: Path) -> dict[str, str]:
    """``SHA256SUMS`` (``<hex>  <path>`` lines) as {path: hex}; {} when absent."""
    sums: dict[str, str] = {}
    f = root / "SHA256SUMS"
    if f.is_file():
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                digest, _, rel = line.strip().partition("  ")
                sums[rel.strip()] = digest.strip()
    return sums


def write_sums(root: Path, paths: Iterable[str]) -> Path:
    lines = [f"{sha256_file(root / rel)}  {rel}" for rel in paths if (root / rel).is_file()]
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "SHA256SUMS"


def check(metrics_dir: str | Path, files: Sequence[WeightFile] | None = None) -> dict:
    """Verify DIR: each file present, its sha256 equal to the project's record, else to SHA256SUMS.

    Returns {"ok", "missing", "different", "unknown" (no hash recorded anywhere), "verified", "lines"}.
    """
    files = FILES if files is None else files
    root = Path(metrics_dir)
    if not root.is_dir():
        raise UserError(f"weights folder not found: {root} (create it with `{FETCH_HINT.format(dir=root)}`)")
    sums = read_sums(root)
    res: dict = {"missing": [], "different": [], "unknown": [], "verified": [], "lines": []}
    for wf in files:
        f = root / wf.path
        if not f.is_file():
            res["missing"].append(wf.path)
            res["lines"].append(f"MISSING    {wf.path}")
            continue
        got = sha256_file(f)
        expected, source = (wf.sha256, "project") if wf.sha256 else (sums.get(wf.path), "SHA256SUMS")
        if expected is None:
            res["unknown"].append(wf.path)
            res["lines"].append(f"UNKNOWN    {wf.path} (no hash recorded in the project or SHA256SUMS; sha256 {got})")
        elif got != expected:
            res["different"].append(wf.path)
            res["lines"].append(f"DIFFERENT  {wf.path} (sha256 {got}, {source} records {expected})")
        else:
            res["verified"].append(wf.path)
            note = "" if wf.sha256 else " (project hash UNKNOWN: checked against SHA256SUMS written at fetch)"
            res["lines"].append(f"OK         {wf.path}{note}")
    res["ok"] = not (res["missing"] or res["different"])
    return res


def fetch(to: str | Path, files: Sequence[WeightFile] | None = None, download=None) -> Path:
    """Download every file into ``to`` (needs the network; only when asked), then write SHA256SUMS and fetch.json.

    ``download(repo, filename, revision) -> local path`` defaults to ``huggingface_hub.hf_hub_download``.
    """
    import shutil

    files = FILES if files is None else files
    root = Path(to)
    root.mkdir(parents=True, exist_ok=True)
    if download is None:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as exc:  # pragma: no cover - transformers depends on it
            raise UserError(f"metrics fetch needs huggingface_hub: {exc}") from exc

        def download(repo, filename, revision):
            return hf_hub_download(repo_id=repo, filename=filename, revision=revision)
    record = []
    for wf in files:
        repo = wf.repo
        if repo.startswith("archive:"):
            repo = archive_encoder_name(root / repo[len("archive:"):])
        try:
            src = download(repo, wf.filename, wf.revision)
        except Exception as exc:  # network, auth, missing file: one line naming the file
            raise UserError(f"could not download {repo}/{wf.filename}"
                            f"{'@' + wf.revision if wf.revision else ''}: {exc}") from exc
        dest = root / wf.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        digest = sha256_file(dest)
        if wf.sha256 and digest != wf.sha256:
            raise UserError(f"{wf.repo}/{wf.filename}: sha256 {digest} differs from the project's {wf.sha256}")
        resolved = wf.revision or _snapshot_commit(src) or "UNPINNED (hub default branch at fetch time)"
        record.append({"path": wf.path, "repo": repo, "filename": wf.filename, "revision": resolved,
                       "sha256": digest})
    write_sums(root, [wf.path for wf in files])
    (root / "fetch.json").write_text(json.dumps({"files": record}, indent=2) + "\n", encoding="utf-8")
    return root


def _snapshot_commit(path) -> str | None:
    """The commit of a hub cache path (``.../snapshots/<40 hex>/<filename>``); None for any other path."""
    parts = Path(path).parts
    for i, part in enumerate(parts[:-1]):
        if part == "snapshots" and i + 1 < len(parts) - 1 and len(parts[i + 1]) == 40:
            return parts[i + 1]
    return None


def archive_encoder_name(archive: Path) -> str:
    """The hub id of the BERT an AllenNLP RadGraph archive was trained on (from its config.json)."""
    import tarfile

    if not archive.is_file():
        raise UserError(f"{archive} is missing: fetch downloads the archive before its encoder")
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.removeprefix("./") == "config.json":
                cfg = json.loads(tar.extractfile(m).read())
                name = (((cfg.get("model") or {}).get("embedder") or {}).get("token_embedders") or {}).get("bert", {})
                if name.get("model_name"):
                    return name["model_name"]
    raise UserError(f"{archive}: config.json names no model.embedder.token_embedders.bert.model_name")


# ------------------------------------------------------------------------------------------------ parity record
PARITY_FILE = "parity.json"


def parity_status(metrics_dir: str | Path | None) -> dict:
    """{"checked": bool, ...} from DIR/parity.json: checked only when a parity run passed on this folder."""
    if metrics_dir is None:
        return {"checked": False, "note": "parity not checked"}
    f = Path(metrics_dir) / PARITY_FILE
    if not f.is_file():
        return {"checked": False, "note": "parity not checked (run `clinicalblip metrics parity`)"}
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {"checked": False, "note": f"parity not checked ({f} is unreadable)"}
    ok = bool(rec.get("passed"))
    return {"checked": ok, "note": "parity checked" if ok else "parity not checked (the last parity run failed)",
            "record": rec}
