"""Bits per byte per Pile component, BLEU/chrF, result tables."""
