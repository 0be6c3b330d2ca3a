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
    p.set_defaults(func=lambda args: _not_yet("data prepare"))


def _add_data_check(dsub) -> None:
    p = dsub.add_parser("check", help="validate every record of a manifest (exit 1 if any is unusable)")
    p.add_argument("manifest")
    p.set_defaults(func=lambda args: _not_yet("data check"))


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
    p.add_argument("--context", choices=["real", "none", "generic"], default="real",
                   help="manifest mode ablations: real indications, none, or a generic one for every study")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="only the first N studies of the split")
    p.add_argument("--json", action="store_true", help="single study: print prompt, qformer_prompt, report as JSON")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    from clinicalblip import generate as G

    if args.image:
        if args.manifest:
            raise UserError("give either --image (one study) or --manifest (a split), not both")
        result = G.generate_single(
            args.model_dir, images=args.image, indication=args.indication, history=args.history,
            comparison=args.comparison, template=args.template, max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
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
        batch_size=args.batch_size, limit=args.limit,
    )
    print(f"wrote {n} predictions to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------- eval / label
def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="NLG metrics (pycocoevalcap) + clinical F1 for a predictions file")
    p.add_argument("predictions")
    p.add_argument("--out", required=True, help="metrics.json")
    p.set_defaults(func=lambda args: _not_yet("eval"))


def _add_label(sub) -> None:
    p = sub.add_parser("label", help="CheXpert-style labels (14 observations) for reports")
    p.add_argument("input")
    p.add_argument("--out", required=True)
    p.set_defaults(func=lambda args: _not_yet("label"))


# ---------------------------------------------------------------------------------------------- merge
def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold a stage chain into one plain transformers checkpoint")
    p.add_argument("stage_dir")
    p.add_argument("--out", required=True, help="release folder")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args) -> int:
    from clinicalblip.merge import merge_stage_chain

    info = merge_stage_chain(args.stage_dir, args.out, dtype=args.dtype)
    print(json.dumps(info, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------- main
def _not_yet(verb: str) -> int:
    raise UserError(f"'{verb}' is not available in this version")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clinicalblip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{data,train,generate,eval,label,merge}")
    _add_data(sub)
    _add_train(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_label(sub)
    _add_merge(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        if os.environ.get("CLINICALBLIP_DEBUG"):
            raise
        msg = str(exc) if isinstance(exc, UserError) else f"{exc.strerror or exc}: {exc.filename}"
        print(f"clinicalblip {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
