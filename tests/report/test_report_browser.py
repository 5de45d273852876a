"""report.html in a real browser: headless Chromium decodes every embedded image and the page logs no error.

report.html carries no JavaScript; the test's own copy gets one small script that, once the page has loaded,
writes each image's decoded width into a body attribute that ``--dump-dom`` then prints.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from pf_ray.report import write_report
from tests.report.test_report import make_finished_run

PROBE = """<script>
window.addEventListener("load", () => {
  document.body.setAttribute("data-imgs", [...document.images].map(i => i.complete ? i.naturalWidth : 0).join(","));
});
</script>
"""


def test_chromium_decodes_every_image_and_logs_no_error(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    _, html_path = write_report(make_finished_run(tmp_path))
    html = html_path.read_text()
    probe_copy = tmp_path / "probe.html"
    probe_copy.write_text(html.replace("</body>", PROBE + "</body>"))

    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
         "--dump-dom", probe_copy.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    widths = re.search(r'data-imgs="([0-9,]*)"', result.stdout)
    assert widths, f"the probe did not run; stdout starts {result.stdout[:300]!r}"
    decoded = [int(width) for width in widths.group(1).split(",") if width]
    assert len(decoded) == html.count("<img ") >= 3
    assert all(width > 0 for width in decoded), decoded
    page_errors = [line for line in result.stderr.splitlines() if "Uncaught" in line or ":ERROR:CONSOLE" in line]
    assert not page_errors, page_errors
