"""report.html in a real browser: it renders, and the widest table fits a 1,280 px page.

Needs a headless Chromium (``chromium``, ``chromium-browser`` or ``google-chrome`` on PATH); skipped with the
reason otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium on PATH (apt-get install chromium)")
# Measures the page once laid out at 1,280 px: the document's width, and the widest table's.
_PROBE = """<script>window.onload = () => { const w = [...document.querySelectorAll('table')].map(t => t.scrollWidth);
document.title = JSON.stringify({page: document.documentElement.scrollWidth, table: Math.max(...w)}); };</script>"""


def _browser(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_committed_report_renders_and_fits_1280_px(tmp_path):
    page = tmp_path / "report.html"
    page.write_text((ROOT / "results" / "report" / "report.html").read_text().replace("</body>", _PROBE + "</body>"))
    shot = tmp_path / "shot.png"
    done = _browser(f"--screenshot={shot}", page.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000, done.stderr[-2000:]
    dom = _browser("--dump-dom", page.as_uri()).stdout
    sizes = dom.split("<title>", 1)[1].split("</title>", 1)[0]
    import json

    measured = json.loads(sizes)
    assert measured["page"] <= 1280 and measured["table"] <= 1280, measured
