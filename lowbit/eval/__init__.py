"""Evaluation: the text corpora that perplexity measurement and quantization calibration read."""
