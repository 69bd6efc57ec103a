"""How fast each run learned each task: the first logged training step (of 375; the log
prints every 18th step) at which the step's answer cross-entropy fell below a threshold, and
the mean cross-entropy of the last 10 % of the steps (`final_loss` in `progress.json`).

Usage, from this folder: python3 learning_speed.py [THRESHOLD]   (default 0.5)
"""

import json
import re
import sys
from pathlib import Path

def first_below(log: str, threshold: float) -> dict:
    """Per task: the first logged training step whose ce is below `threshold`, or None."""
    found = {}
    for match in re.finditer(r"task \d+/\d+: (\w+)\n(.*?)(?=task \d+/\d+|\Z)", log, re.S):
        steps = re.findall(r"train (\d+)/\d+ \S+ ce ([\d.]+)", match.group(2))
        found[match.group(1)] = next((int(s) for s, ce in steps if float(ce) < threshold), None)
    return found


def main() -> None:
    threshold = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
    here = Path(__file__).parent
    runs = sorted(p.parent for p in here.glob("*/run.log"))
    # Every run here learns the tasks in CoIN's order; the header is the first run's.
    tasks = json.loads((runs[0] / "report.json").read_text())["tasks"]
    print(f"First logged step with ce < {threshold} / final ce (- : never)\n")
    print("| run | " + " | ".join(tasks) + " |")
    print("|---" * (len(tasks) + 1) + "|")
    for run in runs:
        found = first_below((run / "run.log").read_text(), threshold)
        final = json.loads((run / "progress.json").read_text())["final_loss"]
        assert json.loads((run / "report.json").read_text())["tasks"] == tasks, run
        cells = []
        for task, loss in zip(tasks, final):
            step = found.get(task)
            cells.append(f"{'-' if step is None else step} / {loss:.2f}")
        print(f"| `{run.name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
