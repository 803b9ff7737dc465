"""The model stage: one GPT (gpt2- and llama-style blocks), its KV cache, and named presets."""
