"""Which answer tokens of the eight Mini-CoIN tasks the base model has learned to write.

A row of `lm_head` whose token never was a target in pretraining only ever receives the
softmax's push-down gradient, the same for every such row: the rows drift together along one
direction. The rows of ids past the tokenizer's vocabulary (never a target) define it; a
token whose row lies as far along it (projection > 0.5: those rows give 0.52 to 0.69, the
tokens the pretraining writes mostly below 0.35) was never written by the base.

Usage: python3 answer_tokens.py MODEL_DIR DATA_DIR
  MODEL_DIR: an HF-layout LLaVA (model.safetensors in float16, tokenizer.json)
  DATA_DIR:  a Mini-CoIN folder (`cmoe mini-coin --out DIR`, or a run's `data/`)
Standard library only.
"""

import json
import math
import re
import struct
import sys
from collections import Counter
from pathlib import Path

THRESHOLD = 0.5
# GPT-2's pre-tokenizer for ASCII text (Mini-CoIN's answers are ASCII).
PRE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def lm_head(model_dir: Path):
    with open(model_dir / "model.safetensors", "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        meta = header["language_model.lm_head.weight"]
        assert meta["dtype"] == "F16", meta["dtype"]
        start, end = meta["data_offsets"]
        f.seek(8 + size + start)
        rows, width = meta["shape"]
        values = struct.unpack(f"<{rows * width}e", f.read(end - start))
    return [values[i * width:(i + 1) * width] for i in range(rows)]


class Bpe:
    def __init__(self, tokenizer: dict):
        model = tokenizer["model"]
        self.vocab = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.rank = {m: i for i, m in enumerate(merges)}

    def word(self, piece: str) -> list:
        parts = list(piece)
        while len(parts) > 1:
            pairs = [(self.rank.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(self, text: str) -> list:
        # add_prefix_space, as the shipped tokenizer; ASCII only, so bytes are characters
        # except the space, which byte-level BPE writes as "Ġ".
        tokens = []
        for piece in PRE.findall(" " + text):
            tokens += self.word(piece.replace(" ", "Ġ"))
        return tokens


def main() -> None:
    model_dir, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
    rows = lm_head(model_dir)
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    bpe = Bpe(tokenizer)
    ids = list(bpe.vocab.values()) + [t["id"] for t in tokenizer.get("added_tokens", [])]
    known = max(ids) + 1
    never = rows[known:]
    mean = [sum(col) / len(never) for col in zip(*never)]
    norm = math.sqrt(sum(x * x for x in mean))

    def along(token: str) -> float:
        return sum(a * b for a, b in zip(rows[bpe.vocab[token]], mean)) / norm

    past = sorted(sum(a * b for a, b in zip(r, mean)) / norm for r in never)
    print(f"rows past the vocabulary ({len(never)}): projection {past[0]:.2f} to {past[-1]:.2f}\n")
    print("| task | answers | answer tokens never written by the base | share of answers with one |")
    print("|---|---|---|---|")
    for task in sorted(p.name for p in (data_dir / "Instructions").iterdir()):
        records = json.loads((data_dir / "Instructions" / task / "train.json").read_text())
        answers = Counter(r["conversations"][1]["value"] for r in records)
        dead = Counter()
        with_dead = 0
        for answer, count in answers.items():
            tokens = [t for t in bpe.encode(answer) if along(t) > THRESHOLD]
            dead.update({t: count for t in sorted(set(tokens))})
            with_dead += count if tokens else 0
        listed = ", ".join(f"`{t.replace('Ġ', ' ')}`" for t, _ in dead.most_common(12)) or "none"
        print(f"| {task} | {len(answers)} distinct | {listed} | {100 * with_dead / sum(answers.values()):.0f} % |")


if __name__ == "__main__":
    main()
