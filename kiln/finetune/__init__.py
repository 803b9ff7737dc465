"""Instruction fine-tuning: examples to masked batches, the SFT loop, LoRA runs."""
