"""Supervised fine-tuning of a causal LM on conversations (``pilelm finetune --task sft``)."""
