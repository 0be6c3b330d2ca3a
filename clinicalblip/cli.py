"""The command line: one parser per verb, each calling one library function.

Only this module knows about argv. Errors the user can fix (UserError and its kin) end with one line on
stderr and exit code 2; set CLINICALBLIP_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from clinicalblip.errors import UserError
from clinicalblip.prompts import TemplateError


# ---------------------------------------------------------------------------------------------- data
def _add_data(sub) -> None:
    p = sub.add_parser("data", help="prepare, check or synthesise datasets (manifests)")
    dsub = p.add_subparsers(dest="data_cmd", required=True, metavar="{prepare,check,synth}")
    _add_data_synth(dsub)
    _add_data_prepare(dsub)
    _add_data_check(dsub)


def _add_data_synth(dsub) -> None:
    p = dsub.add_parser("synth", help="write the built-in synthetic chest X-ray dataset (images + manifest.jsonl)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=2000, help="number of studies (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.set_defaults(func=_cmd_data_synth)


def _cmd_data_synth(args) -> int:
    from clinicalblip.data.synth import write_synthetic_dataset

    path = write_synthetic_dataset(args.out, n=args.n, seed=args.seed, image_size=args.image_size)
    print(f"wrote {path}")
    return 0


def _add_data_prepare(dsub) -> None:
    p = dsub.add_parser("prepare", help="turn a dataset (iu-xray, mimic-cxr, jsonl, csv) into a manifest")
    psub = p.add_subparsers(dest="source", required=True, metavar="{iu-xray,mimic-cxr,jsonl,csv}")

    iu = psub.add_parser("iu-xray", help="R2Gen annotation.json + the public IU report / projection CSVs")
    iu.add_argument("--annotation", required=True, help="R2Gen annotation.json (split; report = findings)")
    iu.add_argument("--reports", help="indiana_reports.csv (indication, comparison, impression)")
    iu.add_argument("--projections", help="indiana_projections.csv (Frontal / Lateral per image)")
    iu.add_argument("--images", help="image folder (default: images/ beside annotation.json)")
    iu.add_argument("--out", required=True, help="manifest.jsonl to write")

    mc = psub.add_parser("mimic-cxr", help="R2Gen annotation.json or the official PhysioNet layout")
    mc.add_argument("--root", help="folder with mimic-cxr-2.0.0-{split,metadata,chexpert}.csv[.gz] (and files/)")
    mc.add_argument("--annotation", help="R2Gen annotation.json (instead of the official split CSV)")
    mc.add_argument("--split-csv", help="mimic-cxr-2.0.0-split.csv[.gz] (default: found in --root)")
    mc.add_argument("--metadata", help="mimic-cxr-2.0.0-metadata.csv[.gz] for ViewPosition (default: in --root)")
    mc.add_argument("--chexpert", help="mimic-cxr-2.0.0-chexpert.csv[.gz], optional (default: in --root)")
    mc.add_argument("--reports", help="folder holding files/pXX/pNNNNNNNN/sNNNNNNNN.txt (default: --root)")
    mc.add_argument("--images", help="image folder holding files/... (default: --root; R2Gen: images/ beside it)")
    mc.add_argument("--image-ext", choices=["jpg", "dcm", "png"], help="image file type (default: detected)")
    mc.add_argument("--drop-empty", action="store_true", help="leave out studies with neither findings nor impression")
    mc.add_argument("--out", required=True, help="manifest.jsonl to write")

    for fmt in ("jsonl", "csv"):
        t = psub.add_parser(fmt, help=f"your own {fmt.upper()} export, with a column mapping")
        t.add_argument("input", help=f"the {fmt.upper()} file")
        t.add_argument("--map", action="append", default=[], metavar="TARGET=COLUMN",
                       help="e.g. --map findings=report_text --map id=accession --map images=frontal,lateral; "
                            "targets: id patient_id split images views indication history comparison findings "
                            "impression report (a whole report, split into sections)")
        t.add_argument("--images", help="folder that relative image paths start from (default: the input's folder)")
        t.add_argument("--split", help="split for rows without one (e.g. test)")
        t.add_argument("--encoding", default="utf-8-sig", help="text encoding of the input (default utf-8)")
        if fmt == "csv":
            t.add_argument("--delimiter", help="column delimiter (default: ',' or tab, detected)")
        t.add_argument("--keep-columns", action="store_true", help="keep unmapped columns as extra manifest keys")
        t.add_argument("--out", required=True, help="manifest.jsonl to write")

    def run(args) -> int:
        from clinicalblip.data.prepare import format_summary

        if args.source == "iu-xray":
            from clinicalblip.data.iu_xray import prepare_iu_xray

            summary = prepare_iu_xray(args.annotation, args.out, reports=args.reports,
                                      projections=args.projections, images=args.images)
        elif args.source == "mimic-cxr":
            from clinicalblip.data.mimic_cxr import prepare_mimic_cxr

            summary = prepare_mimic_cxr(args.out, root=args.root, annotation=args.annotation,
                                        split_csv=args.split_csv, metadata=args.metadata, chexpert=args.chexpert,
                                        reports=args.reports, images=args.images, image_ext=args.image_ext,
                                        drop_empty=args.drop_empty)
        else:
            from clinicalblip.data.tabular import parse_mapping, prepare_table

            summary = prepare_table(args.input, args.out, fmt=args.source, mapping=parse_mapping(args.map),
                                    images=args.images, split=args.split, encoding=args.encoding,
                                    delimiter=getattr(args, "delimiter", None), keep_columns=args.keep_columns)
        print(format_summary(summary))
        return 0

    p.set_defaults(func=run)


def _add_data_check(dsub) -> None:
    p = dsub.add_parser("check", help="validate every record of a manifest (exit 1 if any is unusable)")
    p.add_argument("manifest")
    p.add_argument("--images", choices=["decode", "exists", "none"], default="decode",
                   help="decode every image (default), only check that files exist, or skip images")
    p.add_argument("--jobs", type=int, default=None, help="image-decoding threads (default: up to 8)")
    p.add_argument("--max-ids", type=int, default=5, help="offending ids shown per problem (default 5)")
    p.add_argument("--json", metavar="PATH", help="also write the per-problem counts and ids as JSON")

    def run(args) -> int:
        from clinicalblip.data.check import check_manifest

        report = check_manifest(args.manifest, check_images=args.images, jobs=args.jobs)
        print(report.format(max_ids=args.max_ids))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(report.to_dict(), fh, indent=2)
        return 0 if report.ok else 1

    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------- train
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one stage from a stage YAML (plain or under accelerate launch)")
    p.add_argument("config", help="stage YAML, e.g. configs/tiny/stage1.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-4 data.manifest=M")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from clinicalblip.config import load_stage_config
    from clinicalblip.train import train_stage

    cfg = load_stage_config(args.config, args.overrides)
    train_stage(cfg)
    return 0


# ---------------------------------------------------------------------------------------------- generate
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="write reports: one study (--image ...) or a manifest split")
    p.add_argument("model_dir", help="a stage folder or a release folder")
    p.add_argument("--manifest", help="manifest.jsonl (with --split and --out)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="predictions JSONL to write (manifest mode)")
    p.add_argument("--image", action="append", default=[], help="image path, repeat once per view (single study)")
    p.add_argument("--indication")
    p.add_argument("--history")
    p.add_argument("--comparison")
    p.add_argument("--template", help="prompt template name (default: the one the stage was trained with)")
    p.add_argument("--context", choices=["real", "none", "generic", "shuffled", "blank_image"], default="real",
                   help="manifest mode ablations: real indications, none, a generic one, another study's, "
                        "or blank images")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default), >1 = beam search")
    p.add_argument("--sample", action="store_true", help="sampling instead of greedy/beam")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--no-repeat-ngram-size", type=int, default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: bf16 on a GPU that supports it, else fp32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="only the first N studies of the split")
    p.add_argument("--json", action="store_true", help="single study: print prompt, qformer_prompt, report as JSON")
    p.set_defaults(func=_cmd_generate)


def _decoding_kwargs(args) -> dict:
    kw = {}
    if args.sample:
        kw["do_sample"] = True
    for name in ("temperature", "top_p", "repetition_penalty", "no_repeat_ngram_size"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    return kw


def _cmd_generate(args) -> int:
    from clinicalblip import generate as G

    if args.image:
        if args.manifest:
            raise UserError("give either --image (one study) or --manifest (a split), not both")
        result = G.generate_single(
            args.model_dir, images=args.image, indication=args.indication, history=args.history,
            comparison=args.comparison, template=args.template, max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams, **_decoding_kwargs(args),
        )
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        else:
            print(result["report"])
        return 0
    if not args.manifest or not args.out:
        raise UserError("generate needs --image PATH (one study) or --manifest M --out PREDS.jsonl (a split)")
    n = G.generate_split(
        args.model_dir, args.manifest, split=args.split, out=args.out, template=args.template,
        context=args.context, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
        batch_size=args.batch_size, limit=args.limit, dtype=args.dtype, **_decoding_kwargs(args),
    )
    if os.environ.get("RANK", "0") == "0":  # once under accelerate launch
        print(f"wrote {n} predictions to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------- eval / label
def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="NLG metrics (pycocoevalcap) + clinical F1 for a predictions file",
        description="Score a predictions JSONL ({id, prediction, reference}): BLEU-1..4, METEOR, ROUGE-L, CIDEr "
                    "under a named protocol, clinical P/R/F1 with bootstrap 95% CIs; writes metrics.json and "
                    "report.md (+ a per-label F1 PNG) beside it.",
    )
    p.add_argument("predictions", help="predictions JSONL")
    p.add_argument("--out", required=True, help="metrics.json to write")
    p.add_argument("--protocol", choices=["r2gen", "r2gen-mimic", "coco-ptb"], default="r2gen",
                   help="r2gen: R2Gen's IU X-Ray cleaning (default); r2gen-mimic: its MIMIC-CXR cleaning; "
                        "coco-ptb: the COCO PTB tokenizer")
    p.add_argument("--labeler", choices=["auto", "chexpert", "synthetic", "chexbert"], default="auto",
                   help="auto: synthetic labels for synthetic records, else the CheXpert-style rules")
    p.add_argument("--uncertain-as", choices=["positive", "negative"], default="positive",
                   help="how uncertain (-1) labels count in P/R/F1 (default positive)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--skip-java-metrics", action="store_true",
                   help="skip METEOR (it needs Java); not possible with --protocol coco-ptb")
    p.add_argument("--no-report", action="store_true", help="write metrics.json only")
    p.add_argument("--chexbert-weights", help="local chexbert.pth (with --labeler chexbert)")
    p.add_argument("--chexbert-tokenizer", help="local bert-base-uncased folder (with --labeler chexbert)")

    def run(args) -> int:
        from clinicalblip.metrics.evaluate_predictions import evaluate_predictions, format_summary

        metrics = evaluate_predictions(
            args.predictions, args.out, protocol=args.protocol, labeler=args.labeler, bootstrap=args.bootstrap,
            seed=args.seed, report_md=not args.no_report, skip_java_metrics=args.skip_java_metrics,
            uncertain_as=args.uncertain_as, chexbert_weights=args.chexbert_weights,
            chexbert_tokenizer=args.chexbert_tokenizer,
        )
        print(format_summary(metrics))
        print(f"wrote {args.out}" + (f" and {metrics['report']}" if metrics.get("report") else ""))
        return 0

    p.set_defaults(func=run)


def _add_label(sub) -> None:
    p = sub.add_parser(
        "label", help="CheXpert-style labels (14 observations) for reports",
        description="Label reports with the 14 CheXpert observations: CSV with id + one column per observation, "
                    "values 1 (positive), 0 (negative), -1 (uncertain), empty (not mentioned).",
    )
    p.add_argument("input", help="JSONL with id + text, or a predictions file (its 'prediction' field)")
    p.add_argument("--out", required=True, help="labels.csv to write")
    p.add_argument("--field", help="the JSON field to label (default: text, else prediction), e.g. reference")
    p.add_argument("--labeler", choices=["chexpert", "chexbert"], default="chexpert",
                   help="chexpert: built-in rules (default); chexbert: needs local weights")
    p.add_argument("--chexbert-weights", help="local chexbert.pth (with --labeler chexbert)")
    p.add_argument("--chexbert-tokenizer", help="local bert-base-uncased folder (with --labeler chexbert)")

    def run(args) -> int:
        from clinicalblip.metrics.labeler import get_labeler, label_file

        options = {}
        if args.labeler == "chexbert":
            options = {"weights": args.chexbert_weights, "tokenizer": args.chexbert_tokenizer}
        info = label_file(args.input, args.out, get_labeler(args.labeler, **options), field=args.field)
        positives = ", ".join(f"{o} {c['1'] + c['-1']}" for o, c in info["counts"].items() if c["1"] + c["-1"])
        print(f"labeled {info['n']} reports with {info['labeler']} -> {info['out']}")
        print(f"positive or uncertain: {positives or 'none'}")
        return 0

    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------- merge
def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold a stage chain into one plain transformers checkpoint")
    p.add_argument("stage_dir")
    p.add_argument("--out", required=True, help="release folder")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--tolerance", type=float, default=None, help="max |logit diff| allowed in verification")
    p.add_argument("--metrics", help="a metrics.json from `clinicalblip eval` to put in the model card")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the release to this hub repo (needs network + login)")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args) -> int:
    from clinicalblip.merge import merge_stage_chain

    info = merge_stage_chain(args.stage_dir, args.out, dtype=args.dtype, tolerance=args.tolerance,
                             max_shard_size=args.max_shard_size, metrics=args.metrics, push_to_hub=args.push_to_hub)
    if info["status"] == "noop":
        print(info["message"])
    else:
        print(f"merged {' -> '.join(info['stages'])} into {info['release_dir']} ({info['dtype']}, "
              f"{info['weights_bytes'] / 2**20:.1f} MiB); verification max |logit diff| "
              f"{info['max_abs_logit_diff']:.2e} <= {info['tolerance']:.0e}")
    return 0


# ---------------------------------------------------------------------------------------------- serve
def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="REST API + web page for a stage or release folder (FastAPI on uvicorn)")
    p.add_argument("model_dir", help="a stage folder or a release folder")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; others warn without a key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: bf16 on a GPU that supports it, else fp32")
    p.add_argument("--quantization", choices=["none", "4bit", "8bit"], default="none",
                   help="bitsandbytes quantization of the language model (release folders, CUDA only)")
    p.add_argument("--max-batch", type=int, default=8, help="studies per generate call (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=15.0, help="how long a batch waits to fill (default 15)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting studies before 503 + Retry-After (default 64)")
    p.add_argument("--max-file-mb", type=float, default=50.0, help="upload limit per file in MB (default 50)")
    p.add_argument("--max-views", type=int, default=None, help="views per study (default: the model's max_views)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a busy shared CPU)")
    p.add_argument("--api-key-env", metavar="VAR",
                   help="environment variable holding the API key: every request then needs "
                        "'Authorization: Bearer <key>'")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from clinicalblip.serve import serve

    serve(args.model_dir, host=args.host, port=args.port, dtype=args.dtype, quantization=args.quantization,
          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
          api_key_env=args.api_key_env, max_file_mb=args.max_file_mb, max_views=args.max_views,
          threads=args.threads)
    return 0


# ---------------------------------------------------------------------------------------------- main
def _not_yet(verb: str) -> int:
    raise UserError(f"'{verb}' is not available in this version")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clinicalblip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{data,train,generate,eval,label,merge,serve}")
    _add_data(sub)
    _add_train(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_label(sub)
    _add_merge(sub)
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, TemplateError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        if os.environ.get("CLINICALBLIP_DEBUG"):
            raise
        msg = f"{exc.strerror or exc}: {exc.filename}" if isinstance(exc, OSError) else str(exc)
        print(f"clinicalblip {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
