#!/usr/bin/env bash
# The GPU check of docs/train.md, under 8 minutes on one GPU: GPT-2 124M on Tiny Shakespeare's GPT-2
# tokens with bf16 and torch.compile (MFU per evaluation from metrics.jsonl), then LoRA fine-tuning and
# kiln sample, all on the GPU. Needs a CUDA build of torch in $PY's environment and KILN_DATA_DIR.
#   PY=.venv/bin/python KILN_DATA_DIR=../shared/data bash bench/gpu_check.sh
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-runs/gpu-check}
rm -rf "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.cuda.get_device_name())"
"$PY" -m kiln train --data tinyshakespeare --tokenizer gpt2 --preset gpt2-124m --device cuda \
    --set batch_size=16 --set block_size=1024 --set grad_accum=4 --set compile=true --set precision=bf16 \
    --set eval_interval=100 --set eval_batches=10 --max-time 4m --out "$OUT/pretrain"
"$PY" - "$OUT/pretrain" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
for r in rows:
    print(f"step {r['step']:>5}  val {r['val_loss']:.3f}  tokens/s {r['tokens_per_s'] or 0:>12,.0f}  MFU {100 * (r['mfu'] or 0):.1f}%")
steady = [r["mfu"] for r in rows[1:] if r["mfu"]]
print(f"MFU after compile and warm-up: {100 * max(steady):.1f}% best, {100 * sum(steady) / len(steady):.1f}% mean")
PYEOF
"$PY" -m kiln finetune "$OUT/pretrain/best" --data instruction-data --lora-r 8 --device cuda \
    --set precision=bf16 --max-time 90s --out "$OUT/lora"
"$PY" -m kiln sample "$OUT/pretrain/best" --prompt "ROMEO:" --max-new-tokens 100 --seed 1 --device cuda
