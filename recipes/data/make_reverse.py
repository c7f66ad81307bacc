"""Generate the tiny recipe's task: reverse a list of three words from a vocabulary of twelve.

    python recipes/data/make_reverse.py          # writes recipes/data/tiny/{train,heldout}.jsonl

Held-out lists never occur in train (as a whole: every word and most word pairs do), so a held-out answer is right
only if the model reverses, rather than recalls, the list. Deterministic for a given --seed; stdlib only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

WORDS = ["bird", "blue", "cat", "dog", "fish", "green", "moon", "red", "rock", "star", "sun", "tree"]


def row(words: tuple[str, ...]) -> dict:
    return {"messages": [{"role": "user", "content": "reverse: " + " ".join(words)},
                         {"role": "assistant", "content": " ".join(reversed(words))}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=600, help="train rows")
    parser.add_argument("--heldout", type=int, default=100, help="held-out rows")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "tiny")
    args = parser.parse_args()
    lists = list(itertools.permutations(WORDS, 3))  # 1320 lists of three different words
    random.Random(args.seed).shuffle(lists)
    heldout, train = lists[:args.heldout], lists[args.heldout:args.heldout + args.train]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("heldout", heldout)):
        with (args.out / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(row(words)) + "\n" for words in rows)
    print(f"wrote {len(train)} train and {len(heldout)} held-out rows to {args.out}")


if __name__ == "__main__":
    main()
