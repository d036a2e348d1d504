"""Per-rank memory of one SAE under each train.strategy: the table in docs/distributed.md.

    python bench/distributed_memory.py [--world 8] [--rows 4096]

Arithmetic, not measurement. Assumptions: fp32 everywhere (4 bytes); P = 2·n·d + n + d
parameters; Adam keeps two moments; gradients as large as the weights; "codes" is the one
(rows × n) fp32 buffer a step cannot avoid (TopK's pre-activations; a dense ReLU step holds about
two). Rows are one rank's share of the global batch under data parallelism and the whole batch
under feature sharding (its ranks read the same rows). W ranks; feature sharding with all W
ranks as feature shards.

    ddp              16P                      every rank: weights, gradients, Adam
    fsdp / ZeRO-3    16P/W + 8P peak          shards at rest; one SAE's whole weights and
                                              gradients while it runs forward/backward
    ZeRO-1           8P + 12P/W               whole weights and gradients; Adam and the fp32
                                              master copy of its weights partitioned
    ZeRO-2           4P + 16P/W (+ buckets)   gradients partitioned too
    feature_sharded  16P/W                    nothing whole, ever; codes n/W wide
"""

from __future__ import annotations

import argparse

GIB = 2**30
FEATURES = (16_384, 131_072, 1_048_576)
WIDTHS = (512, 576, 2_304, 4_096)


def per_rank_bytes(n: int, d: int, world: int, rows: int) -> dict[str, float]:
    p = 2 * n * d + n + d
    word = 4
    return {
        "params": p,
        "weights": word * p,
        "ddp": 16 * p,
        "fsdp": 16 * p / world + 8 * p,
        "zero1": 8 * p + 12 * p / world,
        "zero2": 4 * p + 16 * p / world,
        "feature_sharded": 16 * p / world,
        "codes": word * rows * n,
        "codes_sharded": word * rows * n / world,
    }


def gib(x: float) -> str:
    return f"{x / GIB:,.2f}" if x < 10 * GIB else f"{x / GIB:,.0f}"


def table(world: int, rows: int) -> str:
    lines = [
        f"| features | d | parameters | weights | ddp | fsdp, ZeRO-3 (peak) | ZeRO-1 | ZeRO-2 | feature_sharded "
        f"| codes, {rows:,} rows | codes, sharded |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in FEATURES:
        for d in WIDTHS:
            m = per_rank_bytes(n, d, world, rows)
            lines.append(
                f"| {n:,} | {d:,} | {m['params'] / 1e6:,.0f}M | {gib(m['weights'])} | {gib(m['ddp'])} | {gib(m['fsdp'])} "
                f"| {gib(m['zero1'])} | {gib(m['zero2'])} | {gib(m['feature_sharded'])} | {gib(m['codes'])} "
                f"| {gib(m['codes_sharded'])} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=8, help="ranks (GPUs)")
    parser.add_argument("--rows", type=int, default=4096, help="rows of activations per rank per step")
    args = parser.parse_args()
    print(f"GiB per rank, {args.world} ranks\n")
    print(table(args.world, args.rows))
