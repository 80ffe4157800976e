"""The screenshots of the web page in docs/web.md: docs/web-playground.png and docs/web-runs.png.

    .venv/bin/python docs/make_screenshots.py --adapter routing=runs/continual-support/naive/1-routing/run \\
        --runs runs/continual-support

Starts `tunesmith serve` (the real command) on a free loopback port with the model, the adapters and --runs,
opens the page in headless Chromium (Playwright driving the system's chromium: no browser download), sends one
message to the two panes (base and the first adapter), waits for both replies, then opens a run (one that
continues another, if there is one, so its lineage shows). The PNGs are reduced to a palette to stay small."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

DOCS = Path(__file__).resolve().parent
SYSTEM = ("You are the Northwind Cycles support router. Reply with JSON only: {\"intent\": ..., \"order_id\": ...}. "
          "intent is one of refund, order_status, damaged_item, change_address, product_question, cancel_order. "
          "order_id is the order number in the message (like NW-12345), or null if there is none.")
PROMPT = "My order NW-20931 arrived with a bent front wheel. What can you do?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"tunesmith serve exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("tunesmith serve was not ready in time")


def save_png(png: bytes, path: Path, colors: int = 96) -> int:
    """The screenshot as a palette PNG (flat UI colours survive; photos would not, and there are none)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    image.save(path, optimize=True)
    return path.stat().st_size


def run_to_open(url: str) -> str | None:
    with urllib.request.urlopen(url + "/v1/runs") as response:
        found = json.load(response)["data"]
    finished = [r for r in found if r["status"] == "finished"]
    continued = [r for r in finished if r["parent"] and r["parent"]["id"]]
    return (continued or finished or found or [{"id": None}])[0]["id"]


def shoot(url: str, args) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(url + "/")
        page.wait_for_function("() => document.querySelectorAll('[data-pane=\"0\"] select option').length > 0")
        page.fill("#system", args.system)
        page.fill("#temperature", "0")
        page.fill("#max_tokens", str(args.max_tokens))
        page.fill("#prompt", args.prompt)
        page.press("#prompt", "Enter")
        page.wait_for_function("() => document.querySelectorAll('.msg[data-state=\"streaming\"]').length === 0 && "
                               "document.querySelectorAll('.msg[data-state]').length > 0", timeout=300_000)
        page.evaluate("() => { document.activeElement.blur(); window.scrollTo(0, 0); }")
        size = save_png(page.screenshot(), DOCS / "web-playground.png")
        print(f"docs/web-playground.png: {size // 1024} KB")

        run = args.open or run_to_open(url)
        page.goto(url + "/#runs" + (f"/{quote(run, safe='')}" if run else ""))
        page.locator("#run-detail article, #run-detail p").first.wait_for()
        page.evaluate("() => { document.activeElement.blur(); window.scrollTo(0, 0); }")
        size = save_png(page.screenshot(full_page=True), DOCS / "web-runs.png")  # down to the lineage
        print(f"docs/web-runs.png: {size // 1024} KB (run {run})")
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN")
    parser.add_argument("--runs", metavar="DIR", help="the runs directory the runs view lists")
    parser.add_argument("--open", metavar="RUN_ID", help="the run to show (default: one that continues another)")
    parser.add_argument("--system", default=SYSTEM)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args(argv)
    if not args.chromium:
        raise SystemExit("no Chromium found: apt-get install -y chromium, or pass --chromium PATH")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "tunesmith", "serve", "--model", args.model, "--port", str(port),
                   "--conversations", str(Path(tmp) / "conversations.sqlite")]
        for adapter in args.adapter:
            command += ["--adapter", adapter]
        if args.runs:
            command += ["--runs", args.runs]
        env = {k: v for k, v in os.environ.items() if k != "TUNESMITH_API_KEY"}  # the page shown without the key dialog
        server = subprocess.Popen(command, env=env)
        try:
            wait_ready(url, server)
            shoot(url, args)
        finally:
            server.terminate()
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
