"""The evaluate stage: loss, perplexity and bits per byte on text; ROUGE-L and exact match on answers."""
