"""Helper for tests/test_distributed.py, run under ``accelerate launch``: one LoRA SFT step of
``cai.training.sft.train_sft`` on the tiny model; every rank writes what it saw to OUT/rank<k>.json."""

import json
import os
import sys
from pathlib import Path

from cai.training.sft import SFTTrainConfig, train_sft


def main(out: Path) -> None:
    import torch.distributed as dist

    records = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Question {i}?"},
                                            {"role": "assistant", "content": "A short answer. " * (1 + i % 3)}]}
               for i in range(8)]
    settings = SFTTrainConfig(max_steps=1, batch_size=2, eval_fraction=0, save_merged=True, save_steps=1)
    result = train_sft("tiny-random", records, out / "sft", settings, seed=0, progress=False)
    rank = int(os.environ.get("RANK", "0"))
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world_size": world,
                                                      "steps": result.metrics.get("steps"),
                                                      "merged": str(result.merged_dir)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
