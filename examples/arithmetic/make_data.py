"""Write the arithmetic task's prompt/answer files: train.jsonl (256 prompts) and heldout.jsonl (64 others).

    python examples/arithmetic/make_data.py [--train 256] [--heldout 64] [--seed 0] [--out examples/arithmetic]

Each record is {"prompt": "What is 13 + 7? Answer with the number only.", "answer": "20"}: sums and differences of
two numbers below 20, no prompt in both files. reward.py scores the answers.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def problems(n: int, rng: random.Random, seen: set) -> list[dict]:
    out = []
    while len(out) < n:
        a, b, op = rng.randrange(1, 20), rng.randrange(1, 20), rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        out.append({"prompt": f"What is {a} {op} {b}? Answer with the number only.",
                    "answer": str(a + b if op == "+" else a - b)})
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=256, help="training prompts (default 256)")
    p.add_argument("--heldout", type=int, default=64, help="held-out prompts (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default=str(Path(__file__).parent), help="directory of the two files")
    args = p.parse_args()
    rng, seen = random.Random(args.seed), set()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", problems(args.train, rng, seen))
    write_jsonl(out / "heldout.jsonl", problems(args.heldout, rng, seen))
    print(f"wrote {out / 'train.jsonl'} ({args.train}) and {out / 'heldout.jsonl'} ({args.heldout})")


if __name__ == "__main__":
    main()
