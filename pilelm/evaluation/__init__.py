"""Evaluation: ``documents`` (the split to score), ``bpb`` (bits per byte per Pile component,
the unigram baseline), ``bleu`` (BLEU / chrF), ``results`` (results files, the BPB table and
plot, the run report's eval section), ``evaluate`` (the eval stage)."""
