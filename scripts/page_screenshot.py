"""The chat page's screenshot in docs/: `localllm serve` (the models folder, no config file) on a
free loopback port, the page in headless Chromium, two prompts, the picture taken while the second
answer is still streaming in (not a test).

    .venv/bin/python scripts/page_screenshot.py [--out docs/chat-page.png] [--width 1100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("Name three rivers in Europe.", "Write a Python function that reverses a string.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "chat-page.png")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=760)
    args = parser.parse_args()
    from playwright.sync_api import expect, sync_playwright

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "none.toml"
        config.write_text("")
        server = subprocess.Popen(
            [sys.executable, "-m", "localllm", "serve", "--port", str(port), "--threads", "1"],
            cwd=ROOT,
            env={**os.environ, "LOCALLLM_CONFIG": str(config)},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not become healthy")
                time.sleep(0.2)
            executable = shutil.which("chromium") or "/usr/bin/chromium"
            with sync_playwright() as p:
                sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []
                browser = p.chromium.launch(executable_path=executable, args=sandbox)
                page = browser.new_page(viewport={"width": args.width, "height": args.height})
                page.set_default_timeout(120_000)
                expect.set_options(timeout=120_000)
                page.goto(url + "/")
                expect(page.locator("#model-info .facts")).to_contain_text("tokens per")
                page.click("#toggle-settings")
                page.fill("#max-tokens", "200")
                page.press("#max-tokens", "Tab")
                page.click("#toggle-settings")
                for n, prompt in enumerate(PROMPTS):
                    page.fill("#prompt", prompt)
                    page.press("#prompt", "Enter")
                    if n < len(PROMPTS) - 1:
                        stats = page.locator(".message.assistant .message-stats").nth(n)
                        expect(stats).to_contain_text("tok/s")
                # Mid-answer when the model writes on; after it, when it stops early.
                page.wait_for_function(
                    "() => document.getElementById('stop').hidden || [...document.querySelectorAll("
                    "'.message.assistant .message-body')].pop().textContent.length > 200"
                )
                page.screenshot(path=str(args.out))
                if page.locator("#stop").is_visible():
                    page.click("#stop")
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
