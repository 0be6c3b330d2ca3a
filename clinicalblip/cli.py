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
    dsub = p.add_subparsers(dest="data_cmd", required=True, metavar="{prepare,check,synth,cache}")
    _add_data_synth(dsub)
    _add_data_prepare(dsub)
    _add_data_check(dsub)
    _add_data_cache(dsub)


def _add_data_cache(dsub) -> None:
    p = dsub.add_parser("cache", help="decode + resize every image of a manifest once into a fast image cache",
                        description="Decode every image once (DICOM VOI pipeline, PNG, JPEG in draft mode), resize "
                                    "it as the model's processor does, store uint8 pixels with an index. Resumable "
                                    "(a rerun skips unchanged images), parallel; unreadable images are listed. Train "
                                    "from it with data.image_cache=DIR (or data.manifest=DIR/manifest.jsonl).")
    p.add_argument("manifest", help="manifest.jsonl whose images to cache")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--size", required=True, type=int, help="the processor's input size (e.g. 224 or 384; tiny: 64)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: every CPU)")
    p.add_argument("--resample", default="bicubic", choices=["bicubic", "bilinear", "lanczos", "nearest"],
                   help="the processor's resize filter (BLIP: bicubic)")
    p.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size (slower; default: draft mode)")

    def run(args) -> int:
        from clinicalblip.data.cache import build_cache

        summary = build_cache(args.manifest, args.out, args.size, workers=args.workers, resample=args.resample,
                              jpeg_draft=not args.no_draft)
        print(summary.format())
        return 0

    p.set_defaults(func=run)


def _add_data_synth(dsub) -> None:
    p = dsub.add_parser("synth", help="write the built-in synthetic chest X-ray dataset (images + manifest.jsonl)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=2000, help="number of studies (default 2000)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed: the same seed writes the same images and reports (default 0)")
    p.add_argument("--image-size", type=int, default=64, help="image width and height in pixels (default 64)")
    p.set_defaults(func=_cmd_data_synth)


def _cmd_data_synth(args) -> int:
    from clinicalblip.data.synth import write_synthetic_dataset

    path = write_synthetic_dataset(args.out, n=args.n, seed=args.seed, image_size=args.image_size)
    print(f"wrote {path}")
    return 0


def _add_data_prepare(dsub) -> None:
    p = dsub.add_parser("prepare", help="turn a dataset (iu-xray, open-i, mimic-cxr, jsonl, csv) into a manifest")
    psub = p.add_subparsers(dest="source", required=True, metavar="{iu-xray,open-i,mimic-cxr,jsonl,csv}")

    iu = psub.add_parser("iu-xray", help="R2Gen annotation.json + the public IU report / projection CSVs")
    iu.add_argument("--annotation", required=True, help="R2Gen annotation.json (split; report = findings)")
    iu.add_argument("--reports", help="indiana_reports.csv (indication, comparison, impression)")
    iu.add_argument("--projections", help="indiana_projections.csv (Frontal / Lateral per image)")
    iu.add_argument("--images", help="image folder (default: images/ beside annotation.json)")
    iu.add_argument("--out", required=True, help="manifest.jsonl to write")

    oi = psub.add_parser("open-i", help="the official IU X-Ray distribution: NLMCXR_reports.tgz (XML) + images")
    oi.add_argument("--reports", required=True, help="NLMCXR_reports.tgz, or the folder of its XMLs")
    oi.add_argument("--images", required=True, help="image folder: NLMCXR_png, Kaggle images_normalized, or DICOM")
    oi.add_argument("--annotation", help="R2Gen annotation.json: its split and ids (else a seeded patient split)")
    oi.add_argument("--projections", help="indiana_projections.csv (Frontal / Lateral per image)")
    oi.add_argument("--seed", type=int, default=0, help="seed of the patient split without --annotation")
    oi.add_argument("--out", required=True, help="manifest.jsonl to write")

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
                            "impression report (a whole report, split into sections) age sex")
        t.add_argument("--images", help="folder that relative image paths start from (default: the input's folder)")
        t.add_argument("--split", help="split for rows without one (e.g. test)")
        t.add_argument("--split-by", choices=["patient_id", "id"],
                       help="give rows without a split train/val/test, whole patients (or studies) at a time")
        t.add_argument("--ratios", default="0.7,0.1,0.2", help="train,val,test fractions for --split-by "
                                                              "(default 0.7,0.1,0.2)")
        t.add_argument("--seed", type=int, default=0, help="shuffle seed for --split-by (default 0)")
        t.add_argument("--encoding", default="utf-8-sig",
                       help="text encoding of the input (default utf-8-sig: UTF-8, a leading byte-order mark dropped)")
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
        elif args.source == "open-i":
            from clinicalblip.data.open_i import prepare_open_i

            summary = prepare_open_i(args.reports, args.images, args.out, annotation=args.annotation,
                                     projections=args.projections, seed=args.seed)
        elif args.source == "mimic-cxr":
            from clinicalblip.data.mimic_cxr import prepare_mimic_cxr

            summary = prepare_mimic_cxr(args.out, root=args.root, annotation=args.annotation,
                                        split_csv=args.split_csv, metadata=args.metadata, chexpert=args.chexpert,
                                        reports=args.reports, images=args.images, image_ext=args.image_ext,
                                        drop_empty=args.drop_empty)
        else:
            from clinicalblip.data.prepare import parse_ratios
            from clinicalblip.data.tabular import parse_mapping, prepare_table

            summary = prepare_table(args.input, args.out, fmt=args.source, mapping=parse_mapping(args.map),
                                    images=args.images, split=args.split, encoding=args.encoding,
                                    delimiter=getattr(args, "delimiter", None), keep_columns=args.keep_columns,
                                    split_by=args.split_by, ratios=parse_ratios(args.ratios), seed=args.seed)
        print(format_summary(summary))
        return 0

    p.set_defaults(func=run)


def _add_data_check(dsub) -> None:
    p = dsub.add_parser("check", help="validate every record of a manifest (exit 1 if any is unusable)")
    p.add_argument("manifest", help="manifest.jsonl to check")
    p.add_argument("--images", choices=["header", "decode", "exists", "none"], default="header",
                   help="header: existence, size and header read cheaply (default); decode: decode every image; "
                        "exists: files only; none: skip images")
    p.add_argument("--decode", action="store_true", help="decode every image fully (same as --images decode)")
    p.add_argument("--image-cache", help="an image cache folder: images it holds count as decoded")
    p.add_argument("--jobs", type=int, default=None, help="image-decoding threads (default: up to 8)")
    p.add_argument("--max-ids", type=int, default=5, help="offending ids shown per problem (default 5)")
    p.add_argument("--json", metavar="PATH", help="also write the per-problem counts and ids as JSON")
    p.add_argument("--template", help="the prompt template training will use: a train/val/test record without its "
                                      "target section is unusable (default: empty sections reported per section)")
    p.add_argument("--max-report-tokens", type=int, default=None,
                   help="the stage's data.max_report_tokens: how many reports are longer (counted in words, "
                        "or in --tokenizer tokens)")
    p.add_argument("--tokenizer", help="a local tokenizer folder (the model's): report lengths in its tokens")
    p.add_argument("--config", help="a stage YAML: its data.template and data.max_report_tokens (and model.base's "
                                    "tokenizer, when that is a local folder) unless given above")

    def run(args) -> int:
        from clinicalblip.data.check import check_manifest
        from clinicalblip.data.manifest import read_manifest
        from clinicalblip.data.reportlen import split_report_lengths

        template, limit, tokenizer = args.template, args.max_report_tokens, args.tokenizer
        if args.config:
            from clinicalblip.config import load_stage_config

            cfg = load_stage_config(args.config)
            template = template or cfg.data.template
            limit = limit if limit is not None else cfg.data.max_report_tokens
            if not tokenizer and os.path.isfile(os.path.join(cfg.model.base, "tokenizer_config.json")):
                tokenizer = cfg.model.base
        target = None
        if template:
            from clinicalblip.prompts import load_template

            target = load_template(template).target
        count, unit = None, "words"
        if tokenizer:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
            count, unit = (lambda texts: [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]), \
                "tokens"
        mode = "decode" if args.decode else args.images
        report = check_manifest(args.manifest, check_images=mode, jobs=args.jobs, image_cache=args.image_cache,
                                target=target)
        print(report.format(max_ids=args.max_ids))
        try:
            records = read_manifest(args.manifest)
        except UserError:
            records = []  # lines that do not parse: the summary above names them
        print(split_report_lengths(records, target, limit, count=count, unit=unit))
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
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML + overrides + defaults) with a comment per key, and exit")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from clinicalblip.config import load_stage_config
    from clinicalblip.train import train_stage

    cfg = load_stage_config(args.config, args.overrides)
    if args.print_config:
        from clinicalblip.config_doc import format_config

        print(f"# {args.config}" + (f" + {' '.join(args.overrides)}" if args.overrides else "")
              + ": the resolved stage config (every key; override any with key=value)")
        print(format_config(cfg), end="")
        return 0
    try:
        train_stage(cfg)
    except KeyboardInterrupt:
        import shlex

        from clinicalblip.train import interrupted_message

        if os.environ.get("RANK", "0") == "0":  # once under accelerate launch
            command = shlex.join(["clinicalblip", "train", args.config, *args.overrides])
            print(interrupted_message(cfg, command), file=sys.stderr)
        return 130
    return 0


# ---------------------------------------------------------------------------------------------- generate
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="write reports: one study (--image ...) or a manifest split")
    p.add_argument("model_dir", help="a stage folder or a release folder")
    p.add_argument("--manifest", help="manifest.jsonl (with --split and --out)")
    p.add_argument("--split", default=None, help="manifest mode: the split to generate (default test)")
    p.add_argument("--out", help="manifest mode: predictions JSONL to write; single study: also write the result "
                                 "(prompt, report, settings) as JSON to this file")
    p.add_argument("--image", action="append", default=[], help="image path, repeat once per view (single study)")
    p.add_argument("--indication", help="single study: the indication (reason for the exam)")
    p.add_argument("--history", help="single study: the clinical history")
    p.add_argument("--comparison", help="single study: the prior exam compared with, if any")
    p.add_argument("--view", action="append", default=[],
                   help="single study: the view of each --image, in order (PA, AP, LATERAL...; '' for unknown); "
                        "default: a DICOM's ViewPosition")
    p.add_argument("--age", help="single study: the patient's age (the template's {age} slot)")
    p.add_argument("--sex", help="single study: the patient's sex (the template's {sex} slot)")
    p.add_argument("--hints", help="single study: suspected findings, comma-separated (the template's {hints} slot)")
    p.add_argument("--prior-image", action="append", default=[],
                   help="single study: an image of the prior study (repeatable; frontal first), for a model trained "
                        "with data.prior images or both")
    p.add_argument("--prior-report", help="single study: the prior study's report (model trained with data.prior "
                                          "report or both)")
    p.add_argument("--prior-date", help="single study: the prior study's date (YYYY-MM-DD; with --study-date the "
                                        "prompt shows the interval)")
    p.add_argument("--study-date", help="single study: this study's date (YYYY-MM-DD)")
    p.add_argument("--prior", choices=["model", "none", "report", "images", "both"], default="model",
                   help="manifest mode: what of each study's linked prior the prompt shows: what the model was "
                        "trained with (default), or none / report / images / both (the prior ablations)")
    p.add_argument("--template", help="prompt template name (default: the one the stage was trained with)")
    p.add_argument("--context", choices=["real", "none", "generic", "shuffled", "blank_image"], default="real",
                   help="ablations: real context (default), no indication, a generic one, another study's "
                        "(manifest mode only), or blank images")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest report in tokens (default: the stage's data.max_report_tokens)")
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default), >1 = beam search")
    p.add_argument("--sample", action="store_true", help="sampling instead of greedy/beam")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --sample)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling probability mass (with --sample)")
    p.add_argument("--repetition-penalty", type=float, default=None, help=">1 discourages repeated tokens")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, help="never repeat an n-gram of this size")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: bf16 on a GPU that supports it, else fp32 (both modes)")
    p.add_argument("--quantization", choices=["none", "4bit", "8bit"], default="none",
                   help="load the language model in 4-bit NF4 or 8-bit (bitsandbytes; GPU or CPU), like --load-4bit")
    p.add_argument("--batch-size", type=int, default=None, help="manifest mode: studies per batch (default 16)")
    p.add_argument("--limit", type=int, default=None, help="manifest mode: only the first N studies of the split")
    p.add_argument("--overwrite", action="store_true",
                   help="manifest mode: start --out over instead of resuming it (a resume needs the same settings)")
    p.add_argument("--image-cache", help="manifest mode: read pixels from this `data cache` folder")
    p.add_argument("--workers", type=int, default=-1, help="manifest mode: loader workers (default -1: what the "
                                                          "machine affords; 0: load in the main process)")
    p.add_argument("--json", action="store_true", help="single study: print prompt, qformer_prompt, report as JSON")
    p.add_argument("--on-bad-record", choices=["error", "skip"], default=None,
                   help="manifest mode: records with missing/unreadable images or a duplicate id are refused "
                        "(error, the default) or left out with their ids listed (skip)")
    _add_compile(p)
    p.set_defaults(func=_cmd_generate)


def _add_compile(p) -> None:
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decoding step (default: on with CUDA, off on the CPU, where the first "
                        "compile costs more than a run saves; see README 'Decoding')")


def _decoding_kwargs(args) -> dict:
    kw = {}
    if args.sample:
        kw["do_sample"] = True
    for name in ("temperature", "top_p", "repetition_penalty", "no_repeat_ngram_size"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    return kw


def _refuse_flags(args, why: str, **unset) -> None:
    """A flag the chosen mode would ignore is an error, not a silent no-op."""
    given = ["--" + k.replace("_", "-") for k, default in unset.items() if getattr(args, k) != default]
    if given:
        raise UserError(f"{', '.join(given)} cannot be used {why}")


def _prior_of_args(args) -> dict | None:
    """generate --prior-image/--prior-report/--prior-date/--study-date -> ReportModel.report's prior."""
    if not (args.prior_image or args.prior_report):
        if args.prior_date:
            raise UserError("--prior-date needs the prior itself: --prior-image and/or --prior-report")
        return None
    prior = {"images": args.prior_image, "report": args.prior_report, "study_date": args.prior_date}
    if args.study_date:
        from clinicalblip.data.priors import interval_days

        days = interval_days({"study_date": args.study_date, "prior": {"study_date": args.prior_date}})
        if days is None:
            raise UserError("--study-date needs --prior-date (both YYYY-MM-DD) to give the interval")
        prior["interval_days"] = days
    return {k: v for k, v in prior.items() if v not in (None, [], "")}


def _cmd_generate(args) -> int:
    from clinicalblip.study import StudyInputError

    try:
        return _generate(args)
    except StudyInputError as exc:  # name the flag, not the API's field
        flag = {"images": "--image", "views": "--view", "do_sample": "--sample"}.get(
            exc.field, "--" + exc.field.replace("_", "-"))
        raise UserError(f"{flag}: {exc.message}") from None


def _generate(args) -> int:
    from clinicalblip import generate as G
    from clinicalblip.study import check_decoding

    # checked before anything loads, as the server checks a request
    check_decoding(args.num_beams, args.max_new_tokens, sample_name="--sample", **_decoding_kwargs(args))
    if args.image:
        if args.manifest:
            raise UserError("give either --image (one study) or --manifest (a split), not both")
        _refuse_flags(args, "with --image (one study); they apply to a manifest split",
                      split=None, batch_size=None, limit=None, overwrite=False, on_bad_record=None, prior="model")
        result = G.generate_single(
            args.model_dir, images=args.image, indication=args.indication, history=args.history,
            comparison=args.comparison, template=args.template, max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams, context=args.context, dtype=args.dtype, out=args.out, compile=args.compile,
            views=args.view or None, age=args.age, sex=args.sex, hints=args.hints, quantization=args.quantization,
            prior=_prior_of_args(args), **_decoding_kwargs(args),
        )
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        else:
            print(result["report"])
        return 0
    if not args.manifest or not args.out:
        raise UserError("generate needs --image PATH (one study) or --manifest M --out PREDS.jsonl (a split)")
    _refuse_flags(args, "with --manifest; the manifest gives each study's context (use --context for ablations)",
                  indication=None, history=None, comparison=None, json=False, view=[], age=None, sex=None,
                  hints=None, prior_image=[], prior_report=None,
                  prior_date=None, study_date=None)
    n = G.generate_split(
        args.model_dir, args.manifest, split=args.split or "test", out=args.out, template=args.template,
        context=args.context, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
        batch_size=args.batch_size or 16, limit=args.limit, dtype=args.dtype, overwrite=args.overwrite,
        quantization=args.quantization, image_cache=args.image_cache, num_workers=args.workers,
        on_bad_record=args.on_bad_record or "error", compile=args.compile,
        prior=None if args.prior == "model" else args.prior, **_decoding_kwargs(args),
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
    _add_neural_args(p)
    _add_viewer_args(p, "--html", "also write the self-contained HTML case viewer here")

    def run(args) -> int:
        from clinicalblip.metrics.evaluate_predictions import evaluate_predictions, format_summary

        metrics, records, cases = evaluate_predictions(
            args.predictions, args.out, protocol=args.protocol, labeler=args.labeler, bootstrap=args.bootstrap,
            seed=args.seed, report_md=not args.no_report, skip_java_metrics=args.skip_java_metrics,
            uncertain_as=args.uncertain_as, chexbert_weights=args.chexbert_weights,
            chexbert_tokenizer=args.chexbert_tokenizer, return_cases=True, metrics_dir=args.metrics_dir,
            neural=args.metrics,
        )
        print(format_summary(metrics))
        print(f"wrote {args.out}" + (f" and {metrics['report']}" if metrics.get("report") else ""))
        if args.html:
            from clinicalblip.viewer import write_viewer

            write_viewer(records, metrics, cases, args.html, manifest=args.manifest, metrics_path=args.out,
                         thumbnails=not args.no_thumbnails, thumb_size=args.thumb_size)
            print(f"wrote {args.html} (case viewer, {len(records)} studies)")
        return 0

    p.set_defaults(func=run)


def _add_neural_args(p) -> None:
    p.add_argument("--metrics-dir", help="the weights folder of the neural metrics (`clinicalblip metrics fetch`); "
                                         "read only, nothing is downloaded")
    p.add_argument("--metrics", help="neural metrics, comma-separated: chexbert, sembscore, bertscore, "
                                     "bertscore-radeval, radgraph, radgraph-xl, radcliq, rexrank (= bertscore, "
                                     "sembscore, radgraph, radcliq)")


def _add_metrics(sub) -> None:
    p = sub.add_parser("metrics", help="the neural metrics' weights folder: fetch, check, parity",
                       description="Fetch the weights of CheXbert, RadGraph and the BERTScore encoders into one "
                                   "folder (needs the network, only here), check their sha256, and compare our "
                                   "implementation against the reference packages.")
    msub = p.add_subparsers(dest="metrics_cmd", required=True)
    f = msub.add_parser("fetch", help="download the weights at their recorded revisions (needs the network)")
    f.add_argument("--to", required=True, help="the weights folder to write")

    def run_fetch(args) -> int:
        from clinicalblip.metrics.weights import FILES, fetch

        root = fetch(args.to)
        print(f"wrote {len(FILES)} files, SHA256SUMS and fetch.json to {root}")
        return 0

    f.set_defaults(func=run_fetch)
    c = msub.add_parser("check", help="verify every file's sha256; names missing and different files")
    c.add_argument("dir", help="the weights folder")

    def run_check(args) -> int:
        from clinicalblip.metrics.weights import check

        res = check(args.dir)
        print("\n".join(res["lines"]))
        print(f"{len(res['verified'])} verified, {len(res['missing'])} missing, {len(res['different'])} different, "
              f"{len(res['unknown'])} without a recorded hash")
        return 0 if res["ok"] else 1

    c.set_defaults(func=run_check)
    q = msub.add_parser("parity", help="our metrics vs the reference packages (run in another Python) on reports")
    q.add_argument("--reference-python", required=True,
                   help="a Python interpreter with f1chexbert / radgraph / bert_score installed (older transformers)")
    q.add_argument("--reports", required=True, help="predictions JSONL ({id, prediction, reference})")
    q.add_argument("--metrics-dir", required=True, help="the weights folder (parity.json is written there)")
    q.add_argument("--metrics", default="chexbert,radgraph,bertscore", help="which metrics to compare")
    q.add_argument("--tolerance", type=float, default=None, help="largest allowed difference (default: per metric)")

    def run_parity(args) -> int:
        from clinicalblip.metrics.parity import format_parity, run_parity

        res = run_parity(args.reference_python, args.reports, args.metrics_dir, args.metrics, args.tolerance)
        print(format_parity(res))
        return 0 if res["passed"] else 1

    q.set_defaults(func=run_parity)


def _add_viewer_args(p, flag: str, help_text: str) -> None:
    p.add_argument(flag, required=flag == "--out", help=help_text)
    p.add_argument("--manifest", help="manifest with the studies' images and context (default: the one named in "
                                      "the predictions' provenance, PRED.meta.json)")
    p.add_argument("--thumb-size", type=int, default=160, help="thumbnail long side in pixels (default 160)")
    p.add_argument("--no-thumbnails", action="store_true", help="no images in the page (smaller file)")


def _add_view(sub) -> None:
    p = sub.add_parser(
        "view", help="build the self-contained HTML case viewer for a predictions file",
        description="One offline HTML page (inline CSS/JS, images as downsized data URIs): summary with CIs, "
                    "per-label chart, and a filterable, paginated case browser with thumbnails, context, reference "
                    "vs generated text and the labeler's findings as agree / FP / FN / uncertain badges.",
    )
    p.add_argument("predictions", help="predictions JSONL")
    _add_viewer_args(p, "--out", "the HTML file to write")
    p.add_argument("--metrics", help="metrics.json from `clinicalblip eval` for the summary (else scored here); "
                                     "with --metrics-dir: the neural metrics, as in eval (chexbert, radgraph, ...)")
    p.add_argument("--metrics-json", help="metrics.json from `clinicalblip eval` for the summary (the same as "
                                          "--metrics FILE; use it together with --metrics-dir)")
    p.add_argument("--metrics-dir", help="the weights folder of the neural metrics: the cases show the per-study "
                                         "RadGraph F1 and CheXbert disagreements as `eval --html` does")
    p.add_argument("--protocol", choices=["r2gen", "r2gen-mimic", "coco-ptb"], default="r2gen",
                   help="NLG protocol: r2gen (IU X-Ray cleaning, default), r2gen-mimic, coco-ptb")
    p.add_argument("--labeler", choices=["auto", "chexpert", "synthetic", "chexbert"], default="auto",
                   help="auto: synthetic labels for synthetic records, else the CheXpert-style rules")
    p.add_argument("--uncertain-as", choices=["positive", "negative"], default="positive",
                   help="how uncertain (-1) labels count in P/R/F1 (default positive)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (without --metrics)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--skip-java-metrics", action="store_true", help="skip METEOR (without --metrics)")

    def run(args) -> int:
        from clinicalblip.viewer import view_predictions

        metrics_json, neural = _view_metrics_args(args)
        out = view_predictions(args.predictions, args.out, metrics_json, manifest=args.manifest,
                               protocol=args.protocol, labeler=args.labeler, uncertain_as=args.uncertain_as,
                               skip_java_metrics=args.skip_java_metrics, bootstrap=args.bootstrap, seed=args.seed,
                               thumbnails=not args.no_thumbnails, thumb_size=args.thumb_size,
                               metrics_dir=args.metrics_dir, neural=neural)
        print(f"wrote {out}")
        return 0

    p.set_defaults(func=run)


def _view_metrics_args(args) -> tuple[str | None, str | None]:
    """(metrics.json path, neural metric names) of `view`: ``--metrics`` names neural metrics with --metrics-dir
    (as in eval and compare) and is the metrics.json path without it (its earlier meaning)."""
    from pathlib import Path

    from clinicalblip.metrics.weights import METRIC_CHOICES, require

    if args.metrics_dir is not None:
        if not args.metrics:
            raise UserError("--metrics-dir needs --metrics NAMES (e.g. chexbert,radgraph); give the metrics.json "
                            "summary as --metrics-json FILE")
        if Path(args.metrics).is_file():
            raise UserError(f"with --metrics-dir, --metrics names neural metrics (e.g. chexbert,radgraph); give "
                            f"the metrics.json as --metrics-json {args.metrics}")
        return args.metrics_json, args.metrics
    if args.metrics and args.metrics_json:
        raise UserError("--metrics FILE and --metrics-json FILE both name the metrics.json; give it once")
    names = [n.strip() for n in (args.metrics or "").split(",") if n.strip()]
    if names and not Path(args.metrics).is_file() and all(n in METRIC_CHOICES for n in names):
        require(None, names)  # neural metric names without the folder: the one-line error eval gives
    return args.metrics_json or args.metrics, None


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare", help="paired significance between systems on the same studies (bootstrap CI, permutation p)",
        description="Compare predictions files on the studies they share: for every metric the difference B - A "
                    "(and C - A, ...), a paired bootstrap 95% CI and a paired approximate-randomisation p-value, "
                    "corpus-level metrics recomputed from per-study sufficient statistics; Holm-corrected with "
                    "more than two systems.",
    )
    p.add_argument("predictions", nargs="+", help="predictions JSONL files; the first is the baseline A")
    p.add_argument("--out", required=True, help="compare.json to write")
    p.add_argument("--html", help="also write an HTML page with the tables and the biggest finding disagreements")
    p.add_argument("--viewer", action="append", default=None,
                   help="each system's case viewer, in order (repeat); default PRED.html where it exists")
    p.add_argument("--names", nargs="+", help="system names (default: the file stems)")
    p.add_argument("--resamples", type=int, default=10000, help="bootstrap and permutation resamples (10000)")
    p.add_argument("--seed", type=int, default=0, help="resampling seed (the same seed gives the same CIs and p)")
    p.add_argument("--protocol", choices=["r2gen", "r2gen-mimic", "coco-ptb"], default="r2gen",
                   help="NLG protocol: r2gen (IU X-Ray cleaning, default), r2gen-mimic, coco-ptb")
    p.add_argument("--labeler", choices=["auto", "chexpert", "synthetic"], default="auto",
                   help="auto: synthetic labels for synthetic records, else the CheXpert-style rules")
    p.add_argument("--uncertain-as", choices=["positive", "negative"], default="positive",
                   help="how uncertain (-1) labels count in P/R/F1 (default positive)")
    p.add_argument("--skip-java-metrics", action="store_true", help="skip METEOR (it needs Java)")
    p.add_argument("--min-overlap", type=float, default=0.9,
                   help="refuse when the files share fewer than this fraction of the largest file's studies")
    _add_neural_args(p)

    def run(args) -> int:
        from clinicalblip.metrics.compare import compare_files, format_table, guess_viewer

        if args.viewer and len(args.viewer) != len(args.predictions):
            raise UserError(f"{len(args.viewer)} --viewer pages for {len(args.predictions)} predictions files")
        result = compare_files(
            args.predictions, args.out, names=args.names, resamples=args.resamples, seed=args.seed,
            protocol=args.protocol, labeler=args.labeler, uncertain_as=args.uncertain_as,
            skip_java_metrics=args.skip_java_metrics, min_overlap=args.min_overlap, progress=True,
            metrics_dir=args.metrics_dir, neural=args.metrics,
        )
        print(format_table(result))
        print(f"wrote {args.out}")
        if args.html:
            from clinicalblip.viewer import write_compare_html

            viewers = args.viewer or [guess_viewer(p) for p in args.predictions]
            write_compare_html(result, args.html, viewers)
            print(f"wrote {args.html}")
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
    p.add_argument("stage_dir", help="the last stage folder of the chain (its parents are found from stage.json)")
    p.add_argument("--out", required=True, help="release folder")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the released weights (default: the dtype the base checkpoint is stored in)")
    p.add_argument("--tolerance", type=float, default=None, help="max |logit diff| allowed in verification")
    p.add_argument("--metrics", help="a metrics.json from `clinicalblip eval` to put in the model card (its "
                                     "provenance.model_hash must be a stage of this chain)")
    p.add_argument("--force-metrics", action="store_true",
                   help="attach --metrics even without provenance or from another model; the card says it was "
                        "not verified")
    p.add_argument("--max-shard-size", default="2GB",
                   help="largest safetensors file of the release, e.g. 5GB (default 2GB)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the release to this hub repo (needs network + login)")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args) -> int:
    from clinicalblip.merge import merge_stage_chain

    if args.metrics:  # a wrong file is refused before the chain is read (its chain check comes in merge)
        from clinicalblip.metrics.evaluate_predictions import read_metrics_file

        read_metrics_file(args.metrics)

    info = merge_stage_chain(args.stage_dir, args.out, dtype=args.dtype, tolerance=args.tolerance,
                             max_shard_size=args.max_shard_size, metrics=args.metrics, push_to_hub=args.push_to_hub,
                             force_metrics=args.force_metrics)
    if info["status"] == "noop":
        print(info["message"])
    else:
        print(f"merged {' -> '.join(info['stages'])} into {info['release_dir']} ({info['dtype']}, "
              f"{info['weights_bytes'] / 2**20:.1f} MiB); verification max |logit diff| "
              f"{info['max_abs_logit_diff']:.2e} <= {info['tolerance']:.0e}")
        if "max_abs_logit_diff_vs_trained" in info:
            print(f"the last stage trained quantized (QLoRA): the release differs from the quantized chain by "
                  f"{info['max_abs_logit_diff_vs_trained']:.3g} (recorded in clinicalblip.json and the card)")
    return 0


# ---------------------------------------------------------------------------------------------- serve
def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="REST API + web page for a stage or release folder (FastAPI on uvicorn)")
    p.add_argument("model_dir", help="a stage folder or a release folder")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; others warn without a key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: bf16 on a GPU that supports it, else fp32")
    p.add_argument("--quantization", choices=["none", "4bit", "8bit"], default="none",
                   help="bitsandbytes quantization of the language model (GPU or CPU)")
    p.add_argument("--max-batch", type=int, default=8, help="studies per generate call (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=15.0, help="how long a batch waits to fill (default 15)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting studies before 503 + Retry-After (default 64)")
    p.add_argument("--max-file-mb", type=float, default=50.0, help="upload limit per file in MB (default 50)")
    p.add_argument("--max-views", type=int, default=None, help="views per study (default: the model's max_views)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for generation (default: torch's choice; 1 is faster on a busy shared "
                        "CPU)")
    p.add_argument("--in-process", action="store_true",
                   help="generate in the server process instead of a model worker process (simpler to debug; "
                        "slower under load, as HTTP handling and generation then share one GIL)")
    p.add_argument("--generation-timeout", type=float, default=300.0, metavar="S",
                   help="a batch generating longer than S seconds fails with 504 and the model worker is restarted "
                        "(default 300)")
    _add_compile(p)
    p.add_argument("--decode", choices=["fast", "hf"], default="fast",
                   help="fast: the static-cache decode path (default); hf: plain transformers generate, the same "
                        "tokens slower (for comparisons)")
    p.add_argument("--api-key-env", metavar="VAR",
                   help="environment variable holding the API key: every request then needs "
                        "'Authorization: Bearer <key>'")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from clinicalblip.serve import serve

    serve(args.model_dir, host=args.host, port=args.port, dtype=args.dtype, quantization=args.quantization,
          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
          api_key_env=args.api_key_env, max_file_mb=args.max_file_mb, max_views=args.max_views,
          threads=args.threads, in_process=args.in_process, compile=args.compile,
          generation_timeout_s=args.generation_timeout, decode=args.decode)
    return 0


# ---------------------------------------------------------------------------------------------- main
def _not_yet(verb: str) -> int:
    raise UserError(f"'{verb}' is not available in this version")


DESCRIPTION = """\
Radiology report generation with InstructBLIP: prepare a dataset, train LoRA stages, write reports,
score them, and merge the stages into one checkpoint that plain transformers loads.

typical order:
  clinicalblip data prepare ... --out manifest.jsonl   (or: data synth --out DIR)
  clinicalblip train configs/tiny/stage1.yaml          (then stage2.yaml, ...)
  clinicalblip generate STAGE_DIR --manifest manifest.jsonl --out preds.jsonl
  clinicalblip eval preds.jsonl --out metrics.json
  clinicalblip merge STAGE_DIR --out release/

`clinicalblip VERB --help` describes each verb."""


def build_parser() -> argparse.ArgumentParser:
    from clinicalblip import __version__

    parser = argparse.ArgumentParser(prog="clinicalblip", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"clinicalblip {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{data,train,generate,eval,view,compare,label,merge,serve,metrics}")
    _add_data(sub)
    _add_train(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_view(sub)
    _add_compare(sub)
    _add_label(sub)
    _add_merge(sub)
    _add_serve(sub)
    _add_metrics(sub)
    return parser


# Known-noisy warnings, silenced one by one (never all: PEFT and DeepSpeed warn about setups that train wrongly).
# PEFT reads model.is_gradient_checkpointing, which transformers 5 deprecates on every LoRA load.
QUIET_WARNINGS = [(FutureWarning, r"`is_gradient_checkpointing` is deprecated")]


def main(argv: list[str] | None = None) -> int:
    import warnings

    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
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
