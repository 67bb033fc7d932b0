"""Write a GLUE sentiment task (SST-2) as chat conversations, for the main job (`make run`).

Each sentence becomes one OpenAI-style conversation whose answer is the label as a word:

    {"messages": [{"role": "user", "content": "<question>\n\nReview: <sentence>"}, {"role": "assistant", "content": "positive"}]}

so the model learns to answer in text, and the run's held-out ``accuracy`` is the exact match of its first word
(peftkit.train.generation.answer_accuracy). The training file is a seeded, class-balanced sample of train.tsv; the
evaluation file takes dev.tsv's first sentences (GLUE's dev split: never trained on).

    python scripts/glue_chat.py --glue ../shared/data/glue/SST-2 --out runs/data --train 1000 --dev 200
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

QUESTION = "Is the sentiment of this movie review positive or negative? Answer with one word."
WORDS = {"0": "negative", "1": "positive"}


def read_tsv(path: Path) -> list[tuple[str, str]]:
    """(sentence, label) rows of a GLUE SST-2 file (header ``sentence<TAB>label``, no quoting)."""
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(s.strip(), label) for s, label in (line.rsplit("\t", 1) for line in lines if line.strip())]


def conversation(sentence: str, label: str) -> dict:
    return {"messages": [{"role": "user", "content": f"{QUESTION}\n\nReview: {sentence}"},
                         {"role": "assistant", "content": WORDS[label]}]}


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(conversation(s, label)) + "\n" for s, label in rows), encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue", default="../shared/data/glue/SST-2", help="the SST-2 folder (train.tsv, dev.tsv)")
    parser.add_argument("--out", default="runs/data", help="folder for sst2_train.jsonl and sst2_dev.jsonl")
    parser.add_argument("--train", type=int, default=1000, help="training sentences, half of each class")
    parser.add_argument("--dev", type=int, default=200, help="evaluation sentences from dev.tsv")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    glue, out = Path(args.glue), Path(args.out)
    train = read_tsv(glue / "train.tsv")
    rng = random.Random(args.seed)
    rng.shuffle(train)
    picked = [r for r in train if r[1] == "0"][: args.train // 2] + [r for r in train if r[1] == "1"][: args.train - args.train // 2]
    rng.shuffle(picked)
    write_jsonl(out / "sst2_train.jsonl", picked)
    write_jsonl(out / "sst2_dev.jsonl", read_tsv(glue / "dev.tsv")[: args.dev])
    print(f"wrote {out / 'sst2_train.jsonl'} ({len(picked)} conversations) and {out / 'sst2_dev.jsonl'} ({args.dev})")


if __name__ == "__main__":
    main()
