"""A base's held-out stage-2 accuracy split by the answer's format, for the kinds that
`stage-2-answers.patch` gives two formats (counts in words or digits, colour choices plain or
lettered, boxes in pixels or fractions), and the lettered colour choices' two parts: is the
colour right, is the letter right.

Usage: python3 heldout_formats.py ANSWERS.jsonl
  ANSWERS.jsonl: `cmoe eval-base --model MODEL_DIR --answers ANSWERS.jsonl`
Standard library only.
"""

import json
import re
import sys
from collections import Counter


def in_digits(text: str) -> bool:
    return re.search(r"\d", text) is not None


def main() -> None:
    rows = [json.loads(line) for line in open(sys.argv[1])]
    splits = {
        "count": lambda r: "digits" if in_digits(r["reference"]) else "words",
        "colour-choice": lambda r: "lettered" if "option" in r["reference"] else "plain",
        "corners": lambda r: "fractions" if "[" in r["reference"] else "pixels",
    }
    print("| kind | format | right | of |")
    print("|---|---|---|---|")
    for kind, split in splits.items():
        right, total = Counter(), Counter()
        for r in rows:
            if r["kind"] == kind:
                fmt = split(r)
                right[fmt] += r["correct"]
                total[fmt] += 1
        for fmt in sorted(total):
            print(f"| {kind} | {fmt} | {right[fmt]} | {total[fmt]} |")
    # Counts: the question does not say which format; the reference's is a hidden coin flip, so
    # a right count is scored right only where the model's format matches it.
    same = [r for r in rows if r["kind"] == "count"
            and in_digits(r["reference"]) == in_digits(r["answer"])]
    print(f"\ncount, answered in the reference's format: {sum(r['correct'] for r in same)} "
          f"right of {len(same)}")
    lettered = [r for r in rows if r["kind"] == "colour-choice" and "option" in r["reference"]]
    # An answer without a letter ("Red.") counts as the letter "-".
    colour = sum(r["answer"].split(",")[0].rstrip(".") == r["reference"].split(",")[0]
                 for r in lettered)
    letters = Counter(r["answer"].rstrip(".").split()[-1] if "option" in r["answer"] else "-"
                      for r in lettered)
    truth = Counter(r["reference"].rstrip(".").split()[-1] for r in lettered)
    print(f"lettered colour choices: colour right {colour} of {len(lettered)}, letter right "
          f"{sum(r['correct'] for r in lettered)}; letters answered {dict(sorted(letters.items()))}, "
          f"right letters {dict(sorted(truth.items()))}")


if __name__ == "__main__":
    main()
