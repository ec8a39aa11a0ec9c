"""Repeated runs of one recipe over several seeds, and honest statistics of them.

    seeds = parse_seeds("0-4")               # [0, 1, 2, 3, 4]; also "0,3,7" or "0-2,9"
    code = run_seeds(cfg, seeds)             # OUT/seed-N/ per seed, then OUT/seeds.csv + summary

The statistic is the FINAL epoch's test accuracy of each run -- never the best
epoch picked on the test set. Running the same command again with the same
--out continues: finished seeds are kept, an interrupted one is resumed.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import re
import statistics
from pathlib import Path

from .config import Config
from .errors import ConfigError
from .files import atomic_write
from .rundir import default_run_dir, read_metrics
from .runner import resume_run, start_run

MAX_SEEDS = 1000


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise ConfigError(f"--seeds {text!r}: use a list and ranges like 0-4 or 0,3,7")
        seeds += range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1)
    if len(set(seeds)) != len(seeds) or len(seeds) > MAX_SEEDS:
        raise ConfigError(f"--seeds {text!r}: seeds must be distinct, at most {MAX_SEEDS}")
    return seeds


def finished(run: Path, epochs: int) -> list[dict] | None:
    """The metrics rows of a run folder that completed all `epochs`, else None."""
    if not (run / "metrics.csv").is_file():
        return None
    rows = read_metrics(run / "metrics.csv")
    return rows if rows[-1]["epoch"] >= epochs else None


def run_seeds(cfg: Config, seeds: list[int]) -> int:
    base = Path(cfg.run.out) if cfg.run.out else default_run_dir()
    results = []
    for seed in seeds:
        run = base / f"seed-{seed}"
        rows = finished(run, cfg.epochs)
        if rows is None:
            if (run / "last.pt").is_file():
                code = resume_run(run, cfg.run.device, cfg.run.progress)
            else:
                one = copy.deepcopy(cfg)
                one.run.seed, one.run.out = seed, str(run)
                code = start_run(one)
            if code != 0:
                return code  # stopped by a signal: the summary waits for the rerun
            rows = finished(run, cfg.epochs)
        final = rows[-1]
        results.append({"seed": seed, "final_test_acc": final["test_acc"], "final_test_loss": final["test_loss"],
                        "final_train_acc": final["train_acc"], "epochs": int(final["epoch"]),
                        "seconds": sum(r["seconds"] for r in rows)})
    summary = summarize(results)
    summary.update(recipe=cfg.recipe, model=cfg.model, seeds=seeds)
    write_results(base, results, summary)
    print(format_summary(summary))
    return 0


def summarize(results: list[dict]) -> dict:
    accs = [r["final_test_acc"] for r in results]
    secs = [r["seconds"] for r in results]
    return {
        "runs": len(results),
        "final_test_acc_mean": statistics.fmean(accs),
        "final_test_acc_std": statistics.stdev(accs) if len(accs) > 1 else math.nan,  # sample std (n - 1)
        "final_test_acc_min": min(accs),
        "final_test_acc_max": max(accs),
        "seconds_mean": statistics.fmean(secs),
    }


def write_results(base: Path, results: list[dict], summary: dict) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(results[0]), lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write(base / "seeds.csv", lambda f: f.write(buf.getvalue().encode()))
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(base / "seeds-summary.json", lambda f: f.write(text.encode()))


def format_summary(s: dict) -> str:
    return (f"{s['runs']} seeds of recipe {s['recipe']} ({s['model']}): final-epoch test accuracy "
            f"mean {100 * s['final_test_acc_mean']:.2f}% +- {100 * s['final_test_acc_std']:.2f} (std), "
            f"min {100 * s['final_test_acc_min']:.2f}%, max {100 * s['final_test_acc_max']:.2f}%; "
            f"{s['seconds_mean']:.1f} s per run (training + evaluation)")
