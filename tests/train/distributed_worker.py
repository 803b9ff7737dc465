"""Run under torchrun by test_distributed.py: each case of a JSON list, one after another in the same
process group; each rank writes the rows it read, rank 0 the losses (the weights are in each run's
checkpoint folder)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import distributed_cases  # noqa: E402

from kiln.distributed import launched_world  # noqa: E402


def main() -> None:
    cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    rank = launched_world().rank
    report = {}
    for case in cases:
        seen = []
        result = distributed_cases.run(
            case["kind"], out / case["name"], case["settings"], case.get("resume", False), seen
        )
        report[case["name"]] = {"seen": seen, "losses": result["losses"], "val_loss": result["val_loss"]}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
