"""How exactly Kiln models survive the trip to transformers and back, at real sizes.

    KILN_DATA_DIR=../shared/data python bench/interop_roundtrip.py

Export: for each block style and tokenizer, a model with random weights (std 0.3, so every tensor
matters) is exported with `export_hf` and loaded with AutoModelForCausalLM / AutoTokenizer. Import: the
real tiny-gpt2 folder and a DistilGPT-2-shaped model (6 layers, 12 heads, 768 wide) made by transformers.
Prints the largest logit difference on 256 tokens of The Verdict (fp32), whether 50 greedy tokens agree,
and whether the tokenizers give the same ids for the whole story.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "interop"))
from hf_compare import greedy_ids, max_logit_gap  # noqa: E402

from kiln.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from kiln.data.tokenizers import EOS, BPETokenizer, CharTokenizer, GPT2Tokenizer  # noqa: E402
from kiln.interop.hf import export_hf, import_hf  # noqa: E402
from kiln.model.gpt import GPT, GPTConfig  # noqa: E402

SHAPES = {
    "gpt2": dict(block_style="gpt2", n_layer=4, n_head=4, n_embd=256, activation="gelu_tanh"),
    "llama": dict(block_style="llama", n_layer=4, n_head=8, n_kv_head=2, n_embd=256, tie_word_embeddings=False),
}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    data_dir = Path(os.environ.get("KILN_DATA_DIR", "../shared/data"))
    text = (data_dir / "the-verdict.txt").read_text()
    tokenizers = {
        "char": CharTokenizer(text, specials=[EOS]),
        "bpe": BPETokenizer.train([text], vocab_size=1024),
        "gpt2": GPT2Tokenizer.resolve(data_dir),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for style, shape in SHAPES.items():
            for kind, tokenizer in tokenizers.items():
                torch.manual_seed(0)
                model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=512, **shape))
                with torch.no_grad():
                    for p in model.parameters():
                        p.normal_(0.0, 0.3)
                folder = tmp / f"{style}-{kind}"
                save_checkpoint(folder / "ckpt", model, tokenizer)
                export_hf(folder / "ckpt", folder / "hf")
                hf_model = AutoModelForCausalLM.from_pretrained(folder / "hf").eval()
                hf_tok = AutoTokenizer.from_pretrained(folder / "hf")
                ids = tokenizer.encode(text)
                gap = max_logit_gap(model, hf_model, torch.tensor([ids[:256]]))
                ours, theirs = greedy_ids(model, hf_model, ids[:20])
                same_ids = hf_tok(text, add_special_tokens=False)["input_ids"] == ids
                rows.append((f"export {style} + {kind}", model.num_params(), gap, ours == theirs, same_ids))

        import_hf(data_dir / "tiny-gpt2", tmp / "tiny")
        tiny = load_checkpoint(tmp / "tiny")
        hf_tiny = AutoModelForCausalLM.from_pretrained(data_dir / "tiny-gpt2").eval()
        ids = tiny.tokenizer.encode(text)
        ours, theirs = greedy_ids(tiny.model, hf_tiny, ids[:20])
        gap = max_logit_gap(tiny.model, hf_tiny, torch.tensor([ids[:256]]))
        same_ids = AutoTokenizer.from_pretrained(data_dir / "tiny-gpt2")(text)["input_ids"] == ids
        rows.append(("import tiny-gpt2 (real)", tiny.model.num_params(), gap, ours == theirs, same_ids))

        torch.manual_seed(0)
        distil = GPT2LMHeadModel(GPT2Config(n_layer=6, n_head=12, n_embd=768)).eval()
        distil.save_pretrained(tmp / "distil")
        for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
            (tmp / "distil" / name).write_bytes((data_dir / "tiny-gpt2" / name).read_bytes())
        import_hf(tmp / "distil", tmp / "distil-kiln")
        kiln_distil = load_checkpoint(tmp / "distil-kiln")
        ours, theirs = greedy_ids(kiln_distil.model, distil, ids[:20])
        gap = max_logit_gap(kiln_distil.model, distil, torch.tensor([ids[:256]]))
        hf_ids = AutoTokenizer.from_pretrained(tmp / "distil")(text)["input_ids"]
        same_ids = hf_ids == kiln_distil.tokenizer.encode(text)
        rows.append(("import DistilGPT-2 shape", kiln_distil.model.num_params(), gap, ours == theirs, same_ids))

    print("| round trip | parameters | max abs logit difference | 50 greedy tokens equal | token ids equal |")
    print("| --- | --- | --- | --- | --- |")
    for name, params, gap, greedy, same in rows:
        print(f"| {name} | {params / 1e6:.2f}M | {gap:.1e} | {'yes' if greedy else 'NO'} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
