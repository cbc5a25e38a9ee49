"""Seed and class lists as the CLIs take them, and how a seed list is split across ranks.

    parse_int_list("0-9,20,30-39")  -> [0, 1, ..., 9, 20, 30, ..., 39]
    parse_int_list("0-49999")       -> the paper's 50k evaluation seeds
    rank_slice(seeds, rank=1, world_size=2) -> seeds[1::2]

Images depend only on their seed, so any split is valid; the interleaved one keeps ranks balanced
when a rerun finds part of the images already written.
"""

import re

_RANGE = re.compile(r"^(\d+)-(\d+)$")
_INT = re.compile(r"^\d+$")


def parse_int_list(text: str) -> list[int]:
    """'1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10]. Ranges are inclusive; order is kept and repeats are
    dropped (first occurrence wins), so each seed's image is made once."""
    values: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        match = _RANGE.match(part)
        if match:
            start, stop = int(match.group(1)), int(match.group(2))
            if stop < start:
                raise ValueError(f"range {part!r} runs backwards")
            values.extend(range(start, stop + 1))
        elif _INT.match(part):
            values.append(int(part))
        else:
            raise ValueError(f"{part!r} is not a non-negative integer or a range like 0-49999")
    if not values:
        raise ValueError(f"no integers in {text!r}")
    return list(dict.fromkeys(values))


def rank_slice(seeds: list[int], rank: int, world_size: int) -> list[int]:
    """The disjoint share of `seeds` that rank `rank` of `world_size` makes (every world_size-th seed)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return seeds[rank::world_size]


def batches(items: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive chunks of at most batch_size items."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
