"""The generate stage: sampling settings, logits processing and token streaming with a KV cache."""
