#!/usr/bin/env python3
"""Screenshot TensorBoard's Time Series page of a sweep: test accuracy against relative time.

    python scripts/tensorboard_screenshot.py multirun/cmp results/tensorboard_sweep.png
    python scripts/tensorboard_screenshot.py multirun/cmp results/tensorboard_hparams.png \
        --page hparams --size 2400x340

Starts `tensorboard` on 127.0.0.1 and headless Chromium (`apt-get install chromium`) with its
DevTools port, sets the horizontal axis to Relative and smoothing to 0 through the page (the
settings pane's own controls), shows the first card matching `--tags` at full width, saves a
PNG and stops both. `--page hparams`: the HParams tab's table instead.
Needs the `websocket-client` package (pip install websocket-client) besides TensorBoard.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# JavaScript run in the page: the settings pane's controls, as a user would set them
RELATIVE = """(async () => {
  const pane = document.querySelector('metrics-dashboard-settings-component');
  pane.querySelector('mat-select .mat-mdc-select-trigger').click();
  await new Promise(r => setTimeout(r, 500));
  const opt = Array.from(document.querySelectorAll('mat-option'))
    .find(o => o.textContent.trim() === 'Relative');
  opt.click();
  const smooth = pane.querySelector('input.slider-input');
  smooth.value = '0';
  smooth.dispatchEvent(new Event('input', {bubbles: true}));
  smooth.dispatchEvent(new Event('change', {bubbles: true}));
  return 'ok';
})()"""
FILTER = """(async () => {
  const box = document.querySelector('input[placeholder="Filter tags (regex)"]');
  box.value = %s;
  box.dispatchEvent(new Event('input', {bubbles: true}));
  await new Promise(r => setTimeout(r, 1500));
  const card = document.querySelector('scalar-card');  // the first match, at full width
  card.querySelector('button[aria-label="Toggle full size mode"]').click();
  await new Promise(r => setTimeout(r, 1000));
  return 'ok';
})()"""


class Page:
    """A Chromium tab driven over the DevTools protocol."""

    def __init__(self, port: int) -> None:
        import websocket  # websocket-client

        for _ in range(50):
            try:
                tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
                break
            except OSError:
                time.sleep(0.2)
        else:
            sys.exit("chromium did not open its DevTools port")
        tab = next(t for t in tabs if t["type"] == "page")
        self.ws = websocket.create_connection(tab["webSocketDebuggerUrl"], timeout=60)
        self.n = 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                return msg.get("result", {})

    def run(self, script: str) -> None:
        out = self.call("Runtime.evaluate", expression=script, awaitPromise=True,
                        returnByValue=True)
        if out.get("result", {}).get("value") != "ok":
            sys.exit(f"the page did not take the setting: {out}")


def wait_http(url: str, seconds: float = 60) -> None:
    end = time.time() + seconds
    while time.time() < end:
        try:
            urllib.request.urlopen(url)
            return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"{url} did not answer")


def capture(logdir: str, out: Path, tags: str, width: int, height: int, where: str) -> None:
    tb_port, cdp_port = 6006, 9222
    procs = [subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", logdir,
                               "--port", str(tb_port), "--host", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    profile = tempfile.mkdtemp(prefix="tb-shot-")
    try:
        wait_http(f"http://127.0.0.1:{tb_port}/data/runs")
        procs.append(subprocess.Popen(
            [shutil.which("chromium") or "chromium", "--headless=new", "--no-sandbox",
             "--disable-gpu", f"--remote-debugging-port={cdp_port}",
             "--remote-allow-origins=*", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "--hide-scrollbars", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        page = Page(cdp_port)
        page.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        page.call("Page.navigate", url=f"http://127.0.0.1:{tb_port}/?darkMode=false#{where}")
        time.sleep(8)
        if where == "timeseries":
            page.run(FILTER % json.dumps(tags))
            page.run(RELATIVE)
        time.sleep(4)
        shot = page.call("Page.captureScreenshot", format="png")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot["data"]))
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logdir")
    p.add_argument("out", type=Path)
    p.add_argument("--tags", default="accuracy/test", help="tag filter (a regex)")
    p.add_argument("--size", default="1400x800", help="WIDTHxHEIGHT of the page")
    p.add_argument("--page", default="timeseries", choices=["timeseries", "hparams"])
    args = p.parse_args()
    width, height = map(int, args.size.split("x"))
    capture(args.logdir, args.out, args.tags, width, height, args.page)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
