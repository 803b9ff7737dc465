"""Hugging Face interop: export Kiln models to transformers' layout, import GPT-2-family checkpoints."""
