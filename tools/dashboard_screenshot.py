"""Screenshots of Optuna Dashboard over a study the tool made: docs/optuna-dashboard*.png come from here.

    python tools/dashboard_screenshot.py sqlite:///runs/tune/mnist-fast.db mnist-fast docs/optuna-dashboard

Starts the real `optuna-dashboard` on 127.0.0.1, opens the study's page and its trials page in
Debian's Chromium (Playwright, headless) and saves PREFIX.png (history) and PREFIX-trial.png
(one trial with its user attributes). Needs the tune and dev extras and /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
VIEWPORT = {"width": 1400, "height": 1000}
SETTLE_MS = 6000  # the dashboard draws its plots after the data arrives
START_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str) -> dict:
    deadline = time.monotonic() + START_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise SystemExit(f"optuna-dashboard did not answer at {url}")
            time.sleep(0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("storage")
    parser.add_argument("study")
    parser.add_argument("prefix", help="PREFIX.png and PREFIX-trial.png are written")
    parser.add_argument("--trial", type=int, help="the trial shown (default: the best)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    port = free_port()
    exe = Path(sys.executable).parent / "optuna-dashboard"
    server = subprocess.Popen([str(exe), args.storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"])
    try:
        base = f"http://127.0.0.1:{port}"
        studies = wait_for(f"{base}/api/studies")["study_summaries"]
        (study,) = [s for s in studies if s["study_name"] == args.study]
        detail = wait_for(f"{base}/api/studies/{study['study_id']}")
        number = args.trial if args.trial is not None else detail["best_trials"][0]["number"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(f"{base}/dashboard/studies/{study['study_id']}")
            page.wait_for_timeout(SETTLE_MS)
            page.screenshot(path=f"{args.prefix}.png")
            page.goto(f"{base}/dashboard/studies/{study['study_id']}/trials?numbers={number}")
            page.wait_for_timeout(SETTLE_MS)
            page.get_by_text("val_loss", exact=False).last.scroll_into_view_if_needed()  # the box scrolls down...
            page.evaluate("for (const e of document.querySelectorAll('*')) e.scrollLeft = 0")  # ...not sideways
            page.screenshot(path=f"{args.prefix}-trial.png")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.prefix}.png, {args.prefix}-trial.png (trial {number})")


if __name__ == "__main__":
    main()
