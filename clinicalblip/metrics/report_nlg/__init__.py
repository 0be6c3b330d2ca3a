"""The `evaluate` module folder: evaluate.load(clinicalblip.metrics.evaluate_module_path())."""
