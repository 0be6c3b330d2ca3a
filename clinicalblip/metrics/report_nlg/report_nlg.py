"""report_nlg: radiology-report NLG metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) as a Hugging Face `evaluate` module.

Load it from this folder, offline (no hub access is needed or attempted with HF_HUB_OFFLINE=1):

    import evaluate
    from clinicalblip.metrics import evaluate_module_path
    metric = evaluate.load(evaluate_module_path())        # or evaluate.load("/path/to/report_nlg")
    metric.compute(predictions=[...], references=[...], protocol="r2gen")

The numbers are exactly those of ``clinicalblip.metrics.nlg.compute_nlg`` (this module only forwards to it):
protocol ``r2gen`` (R2Gen's report cleaning, default), ``r2gen-mimic`` or ``coco-ptb``; ``skip=("METEOR",)`` on a
machine without Java.
"""

import datasets
import evaluate

from clinicalblip.metrics.nlg import compute_nlg

_CITATION = """\
@inproceedings{chen-emnlp-2020-r2gen,
  title = {Generating Radiology Reports via Memory-driven Transformer},
  author = {Chen, Zhihong and Song, Yan and Chang, Tsung-Hui and Wan, Xiang},
  booktitle = {EMNLP}, year = {2020}
}
"""

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated reports (str).
    references: list of reference reports (str), one per prediction.
    protocol: "r2gen" (default), "r2gen-mimic" or "coco-ptb".
    skip: metric names not to compute, e.g. ("METEOR",) without Java.
Returns:
    dict with BLEU_1, BLEU_2, BLEU_3, BLEU_4, METEOR, ROUGE_L, CIDEr (floats, None when skipped), protocol, n.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReportNLG(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/cuhksz-nlp/R2Gen", "https://github.com/salaniz/pycocoevalcap"],
        )

    def _compute(self, predictions, references, protocol="r2gen", skip=()):
        return compute_nlg(list(references), list(predictions), protocol=protocol, skip=tuple(skip))
