"""Memory planner: bytes per rank of a training run, whether it fits a device, and the largest micro-batch that does.

    python -m hvd_llama.plan --config configs/llama2-7b.yaml --world-size 8 --device-memory 80GiB \\
        --set dist.zero_stage=2 --set train.activation_checkpointing=true

The arithmetic is hvd_llama.training.memory's (training runs the same check at start-up); this command prints it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from typing import Optional, Sequence

from hvd_llama.cli import UserError, run_main
from hvd_llama.config import load_config
from hvd_llama.training.memory import GiB, Plan, count_params, gib, max_batch_size, plan, plan_at, with_dist, with_train

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
         "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(text: str, name: str = "--device-memory") -> int:
    """'80GiB' -> 85899345920, '80GB' -> 80000000000, '512MiB', '1e9'-free plain bytes '4096'."""
    match = SIZE.match(text)
    if not match:
        raise UserError(f"{name} {text!r}: expected a size such as 80GiB, 80GB, 512MiB or a number of bytes")
    unit = (match.group(2) or "").lower().rstrip("b") if (match.group(2) or "").lower() != "b" else ""
    value = int(float(match.group(1)) * UNITS[unit])
    if value <= 0:
        raise UserError(f"{name} {text!r}: expected a size above zero")
    return value


def parse_count(text: str, name: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise UserError(f"{name} {text!r}: expected a positive whole number")
    return int(text)


def report(p: Plan, name: str) -> list[str]:
    """The human-readable plan: one line per kind of memory, then the verdict."""
    trainable = "all trainable" if p.trainable == p.parameters else f"{p.trainable:,} trainable"
    other = "without" if p.activation_checkpointing else "with"
    other_bytes = p.activations_full if p.activation_checkpointing else p.activations_checkpointed
    lines = [f"plan for {name}: {p.parameters:,} parameters ({trainable}), {p.world_size} rank(s), "
             f"dist.zero_stage={p.zero_stage}, {p.precision}, train.batch_size={p.batch_size} x {p.seq_len} "
             f"tokens, activation checkpointing {'on' if p.activation_checkpointing else 'off'}, {p.device}",
             f"  weights                    {gib(p.weights):>12}",
             f"  gradients                  {gib(p.gradients):>12}" + (
                 "  (this rank's slice, plus the whole gradients accumulated in fp32 over the micro-steps)"
                 if p.zero_stage >= 1 and p.grad_accum > 1 else ""),
             f"  optimizer state            {gib(p.optimizer):>12}",
             f"  activations / micro-batch  {gib(p.activations):>12}  ({gib(other_bytes)} {other} checkpointing)"]
    if p.weight_copies:
        lines.append(f"  autocast weight copies     {gib(p.weight_copies):>12}")
    if p.buffers:
        lines.append(f"  communication buffers      {gib(p.buffers):>12}")
    lines += [f"  overhead                   {gib(p.overhead):>12}  "
              f"({'CUDA context, workspaces, fragmentation' if p.device == 'cuda' else 'runtime, allocator'})",
              f"  total                      {gib(p.total):>12}",
              f"{'fits' if p.fits else 'does NOT fit'} in {gib(p.device_memory)} per rank; largest micro-batch "
              f"that fits: " + (f"train.batch_size={p.max_batch_size}" if p.max_batch_size else "none (not even 1)")]
    return lines


TABLE_WORLD_SIZES, TABLE_STAGES = (8, 16, 32, 64), (0, 2, 3)


def table(paths: Sequence[str], device_memory: int, overrides: Sequence[str] = ()) -> list[str]:
    """Markdown: for each preset and stage, the largest micro-batch without / with activation checkpointing
    and the model state per rank, at each world size."""
    head = "| preset | parameters | seq_len | stage | " + " | ".join(f"{n} GPUs" for n in TABLE_WORLD_SIZES) + " |"
    lines, fit_nowhere = [head, "|" + " --- |" * (4 + len(TABLE_WORLD_SIZES))], []
    for path in paths:
        base = load_config(path, list(overrides))
        counts, name, fits_somewhere = count_params(base), path.rsplit("/", 1)[-1].removesuffix(".yaml"), False
        for stage in TABLE_STAGES:
            cells = []
            for n in TABLE_WORLD_SIZES:
                cfg = with_dist(base, zero_stage=stage)
                plain = max_batch_size(with_train(cfg, activation_checkpointing=False), n, device_memory,
                                       counts=counts)
                ckpt = max_batch_size(with_train(cfg, activation_checkpointing=True), n, device_memory,
                                      counts=counts)
                state = plan_at(with_train(cfg, batch_size=1), n, device_memory, counts=counts)
                fits_somewhere |= ckpt > 0
                model_state = state.weights + state.gradients + state.optimizer
                cells.append(f"{plain or '–'} / {ckpt or '–'} · {model_state / GiB:.0f} GiB")
            lines.append(f"| {name} | {counts.total / 1e9:.1f}B | {base.train.seq_len} | {stage} | "
                         + " | ".join(cells) + " |")
        if not fits_somewhere:
            fit_nowhere.append(name)
    lines += ["", "Cells: largest micro-batch (train.batch_size) without / with activation checkpointing "
                  "(– = not even 1) · model state per rank (weights + gradients + optimizer)."]
    lines.append(f"Fit at no stage on {TABLE_WORLD_SIZES[-1]} GPUs or fewer: " + (", ".join(fit_nowhere) or "none") + ".")
    return lines


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hvd_llama.plan", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python -m hvd_llama.plan --config configs/llama2-7b.yaml --world-size 8 "
               "--device-memory 80GiB --set dist.zero_stage=2 --set train.activation_checkpointing=true\n"
               "Table:   python -m hvd_llama.plan --device-memory 80GB --table configs/llama*.yaml\n"
               "Exit status: 0 fits, 1 does not fit, 2 bad input.")
    parser.add_argument("--config", help="YAML config (see configs/); defaults apply to anything it leaves out")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set dist.zero_stage=2 (repeatable)")
    parser.add_argument("--world-size", default="1", metavar="N", help="number of ranks (default 1)")
    parser.add_argument("--device-memory", required=True, metavar="SIZE",
                        help="memory per rank: 80GiB, 80GB, 512MiB or bytes")
    parser.add_argument("--device", default="cuda", metavar="cuda|cpu",
                        help="what the fixed overhead is for: a GPU (CUDA context) or a CPU process (default cuda)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (bytes per rank)")
    parser.add_argument("--table", nargs="+", metavar="CONFIG",
                        help="print the README's markdown table for these presets (8, 16, 64 ranks; stages 0-2)")
    return parser.parse_args(argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = parse_args(argv)
    memory = parse_size(args.device_memory)
    world_size = parse_count(args.world_size, "--world-size")
    if args.device not in ("cuda", "cpu"):
        raise UserError(f"--device {args.device!r}: expected cuda or cpu")
    if args.table:
        print("\n".join(table(args.table, memory, args.set)))
        return 0
    result = plan(load_config(args.config, args.set), world_size, memory, args.device)
    print(json.dumps(asdict(result)) if args.json else "\n".join(report(result, args.config or "the defaults")))
    return 0 if result.fits else 1


def main(argv: Optional[Sequence[str]] = None) -> None:
    status = {}
    run_main(lambda a: status.setdefault("code", _main(a)), argv)
    sys.exit(status.get("code", 0))


if __name__ == "__main__":
    main()
