"""The data stage: named sources, tokenizers, prepared token files and the loaders over them."""
