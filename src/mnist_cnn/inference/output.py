"""Where `predict`'s answers go, one at a time as they are ready: text lines, a JSON list,
JSON Lines, and/or a CSV file. A failed image is an {"image", "error"} object in its place.

    with Answers(stdout_format="jsonl", csv_path=Path("out.csv")) as out:
        out.add({"image": "a.png", "digit": 7, ...})
        out.add({"image": "notes.txt", "error": "notes.txt: not an image ..."})
"""

from __future__ import annotations

import csv
import json
import sys
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from mnist_cnn.files import atomic_path

CSV_FIELDS = ["image", "digit", "label", "probability", "error"]


class Answers:
    """stdout_format: "text" (one line per image), "json" (one list, streamed), "jsonl" (one
    object per line). csv_path: also a CSV, written as it goes into a temp file that replaces
    csv_path at the end (an interrupted command leaves no half-written CSV)."""

    def __init__(self, stdout_format: str = "text", csv_path: Path | None = None, stream: TextIO | None = None):
        self.format, self.csv_path = stdout_format, csv_path
        self.stream = stream or sys.stdout
        self.count = 0
        self._stack = ExitStack()
        self._csv: csv.DictWriter[str] | None = None

    def __enter__(self) -> "Answers":
        if self.csv_path is not None:
            tmp = self._stack.enter_context(atomic_path(self.csv_path))
            f = self._stack.enter_context(open(tmp, "w", newline="", encoding="utf-8"))
            self._csv = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
            self._csv.writeheader()
        return self

    def add(self, answer: dict[str, Any]) -> None:
        if self.format == "json":
            self.stream.write(("[\n" if self.count == 0 else ",\n") + json.dumps(answer))
        elif self.format == "jsonl":
            self.stream.write(json.dumps(answer) + "\n")
        elif "error" not in answer:  # text: errors go to stderr, from the caller
            others = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in answer["top3"])
            self.stream.write(
                f"{answer['image']}: {answer['label']} (p={answer['probability']:.3f}; top-3: {others})\n"
            )
        self.stream.flush()
        if self._csv is not None:
            self._csv.writerow(answer)
        self.count += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.format == "json" and exc_type is None:
            self.stream.write("[]\n" if self.count == 0 else "\n]\n")
            self.stream.flush()
        self._stack.__exit__(exc_type, exc, tb)  # the CSV replaces csv_path only when nothing went wrong
