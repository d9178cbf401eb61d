"""Run under a launcher: train with the given config values, then print digests of this rank's parameters.

    python tests/support/train_digests.py RUN_DIR section.key=value ...

Prints `BASE <sha256>` over the base weights and `LORA <sha256>` over the LoRA adapters (empty without LoRA),
each over the tensors' bytes in parameter-name order, so ranks (or a checkpoint) can be compared exactly.
"""
import hashlib
import sys
from pathlib import Path

from hvd_llama import parallel
from hvd_llama.config import load_config
from hvd_llama.training.builder import check_data, load_pretrained
from hvd_llama.training.metrics import MetricsLogger
from hvd_llama.training.trainer import Trainer


def digest(named) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for _, p in sorted(named))).hexdigest()


def main() -> None:
    run_dir = Path(sys.argv[1])
    cfg = load_config(None, sys.argv[2:])
    device = parallel.init(cfg.dist, "cpu")
    meta = check_data(cfg)
    trainer = Trainer(cfg, run_dir, device, load_pretrained(cfg, meta) if cfg.finetune.init_from else None)
    trainer.resume(None)
    trainer.run(MetricsLogger(run_dir, enabled=False, tensorboard=False, console_every=1))
    params = list(trainer.model.named_parameters())
    print("BASE", digest([(n, p) for n, p in params if "lora_" not in n]))
    print("LORA", digest([(n, p) for n, p in params if "lora_" in n]))


if __name__ == "__main__":
    main()
