"""torch-dmc: Distribution Mismatch Correction for PyTorch classifiers."""
