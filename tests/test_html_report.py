"""report.html: self-contained, the table's numbers equal report.json's, and a real browser renders it.

A hand-made store (numbers below) checks the page without a browser; a real tiny benchmark on real
CIFAR-10, written by `kdzoo bench`, is opened in headless Chromium (Debian's `chromium`) through the
DevTools protocol over a pipe: no console errors, no request but the page itself, every plot drawn,
and the table read back from the rendered page equal to report.json. The screenshot is kept under
pytest's temporary folder (its path is printed).

Run as a script, this file writes a screenshot of a report (the README's docs/report.png):
    python tests/test_html_report.py runs/bench/quick/report.html docs/report.png

Hand-made store, last-epoch top-1 (seeds 0, 1, 2; the best epoch is last + 0.5):
  resnet20 → mobilenet   ce 70 71 72; kd 72 74 73 (Δ 2, 3, 1: mean 2, s 1); attention 73 75 77 (Δ 3, 4, 5)
  wrn40_1 → wrn16_1      ce 90 91 92; kd 91 93 failed; attention 92 93 94; reference in test error
95% interval of a mean Δ with s = 1, n = 3: ± t(0.975, 2) / √3 with t(0.975, 2) = 4.30265273 (tables).
"""
from __future__ import annotations

import base64
import fcntl
import json
import math
import os
import re
import select
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

import kdzoo
from kdzoo import cli
from kdzoo.records import BenchRecord, BestEpoch, RunRecord, Scores, TeacherRecord, TeacherRef
from kdzoo.store import Store

pytest.importorskip("matplotlib", reason='the HTML report needs matplotlib: pip install -e ".[report]"')

from kdzoo import html_report  # noqa: E402

T975_2 = 4.30265273  # Student's t, 97.5% quantile, 2 degrees of freedom (tabulated)
ENV = {"device": "Test CPU 9000", "autocast": "bfloat16", "autocast_reason": "test", "kdzoo": "0.1.0",
       "torch": "2.99", "timm": "1.0", "python": "3.11", "threads": 2}
REFERENCE = {"source": "Test et al. 2099, Table 1", "metric": "error", "rows": [
    {"teacher": "wrn40_1", "student": "wrn16_1", "values": {"student": 8.77, "kd": 8.39, "teacher": 6.58}}]}


def _history(final: float, init: bool) -> list[dict]:
    """Three main epochs ending at ``final`` (top-1 final-4, final-1, final), loss terms ce and kd; optionally one
    init-stage epoch first (not evaluated)."""
    main = [{"epoch": e, "stage": "main", "lr": 0.1, "loss": {"ce": 2.0 / e, "kd": 1.0 / e},
             "test": {"top1": final - {1: 4, 2: 1, 3: 0}[e]}} for e in (1, 2, 3)]
    return ([{"epoch": 1, "stage": "init", "lr": 0.1, "loss": {"hint": 5.0}}] if init else []) + main


def _student(pair: tuple[str, str, str, int, int], variant: str, seed: int, top1: float | None) -> RunRecord:
    teacher, key, model, params, flops = pair
    ok = top1 is not None
    return RunRecord(
        run_id=f"{model}-{variant}-{seed}", cohort_id=f"c-{model}-{seed}", status="ok" if ok else "failed",
        error=None if ok else "Loss became non-finite (nan) at epoch 2, step 3.",
        teacher=TeacherRef(model=teacher, key=key, top1=90.0, best_top1=91.0, params=1_000_000),
        model=model, params=params, flops=flops, method_params=0, method=variant, variant=variant, seed=seed,
        epochs_done=3 if ok else 1, history=_history(top1, init=variant == "kd") if ok else [],
        last=Scores(top1=top1) if ok else None, best=BestEpoch(epoch=3, top1=top1 + 0.5) if ok else None,
        wall_time_s=60.0, environment=ENV, recipe={"epochs": 3, "batch_size": 64, "lr": 0.1},
        data={"dataset": "cifar10", "fingerprint": "ab" * 32, "train": 500, "val": 0, "test": 200},
    )


A = ("resnet20", "tA", "mobilenet", 300_000, 40_000_000)
B = ("wrn40_1", "tB", "wrn16_1", 175_000, 27_000_000)
TABLE = {A: {"ce": [70, 71, 72], "kd": [72, 74, 73], "attention": [73, 75, 77]},
         B: {"ce": [90, 91, 92], "kd": [91, 93, None], "attention": [92, 93, 94]}}


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "bench")
    records: list = [TeacherRecord(run_id=f"teacher-{k}", key=k, model=t, seed=0, status="ok", source="trained",
                                   params=1_000_000, last=Scores(top1=90.0), best=BestEpoch(epoch=2, top1=91.0),
                                   wall_time_s=120.0, environment=ENV) for t, k in (("resnet20", "tA"), ("wrn40_1", "tB"))]
    for pair, cells in TABLE.items():
        for variant, values in cells.items():
            records += [_student(pair, variant, seed, None if v is None else float(v)) for seed, v in enumerate(values)]
    for r in records:
        s.write_run(r)
    s.write_bench(BenchRecord(name="unit-html", description="a hand-made store", budget="3 epochs, 500 images",
                              columns=["ce", "kd", "attention"], pairs=[[A[0], A[2]], [B[0], B[2]]], seeds=[0, 1, 2],
                              run_ids=[r.run_id for r in records if isinstance(r, RunRecord)],
                              teachers={"resnet20": "tA", "wrn40_1": "tB"}, reference=REFERENCE))
    return s


class TableReader(HTMLParser):
    """The numbers of the results table: {(teacher, student, variant): {"mean": "71.00", "ci-low": ...}}, and
    every src/href value of the page."""

    FIELDS = {"mean", "std", "delta", "ci-low", "ci-high"}

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str, str], dict[str, str]] = {}
        self.links: list[str] = []
        self.tags: set[str] = set()
        self._cell: tuple[str, str, str] | None = None
        self._field: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.links += [v for k, v in attrs if k in ("src", "href", "xlink:href") and v is not None]
        if tag == "td" and "data-variant" in a:
            self._cell = (a["data-teacher"], a["data-student"], a["data-variant"])
            self.cells[self._cell] = {}
        elif tag == "span" and self._cell and a.get("class") in self.FIELDS:
            self._field = a["class"]

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        if tag == "span":
            self._field = None

    def handle_data(self, data):
        if self._cell and self._field:
            self.cells[self._cell][self._field] = data


def expected_texts(report: dict) -> dict[tuple[str, str, str], dict[str, str]]:
    """What each table cell must show, formatted from report.json as the terminal formats it."""
    out = {}
    for c in report["cells"]:
        want = {}
        if c["mean"] is not None:
            want["mean"] = f"{c['mean']:.2f}"
        if c["std"] is not None:
            want["std"] = f"{c['std']:.2f}"
        if c["delta_vs_ce"] is not None and c["delta_n"]:
            want["delta"] = f"{c['delta_vs_ce']:+.2f}"
        if c["delta_ci_low"] is not None:
            want["ci-low"], want["ci-high"] = f"{c['delta_ci_low']:+.2f}", f"{c['delta_ci_high']:+.2f}"
        out[(c["teacher"], c["student"], c["variant"])] = want
    return out


def test_page_is_self_contained_and_its_table_equals_report_json(store, capsys):
    assert cli.main(["report", str(store.root), "--html"]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (store.root / "report.html").read_text()
    report = json.loads((store.root / "report.json").read_text())
    reader = TableReader()
    reader.feed(page)

    # offline: no script, no stylesheet or font to fetch, every link inside the page, a policy forbidding fetches
    assert not {"script", "link", "img", "iframe", "object"} & reader.tags
    assert reader.links and all(v.startswith("#") for v in reader.links), reader.links
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*https?:|url\(\s*["']?https?:|@import""", page, re.I)
    assert "default-src 'none'" in page

    # the table's numbers are report.json's, formatted as in the terminal
    assert reader.cells == expected_texts(report)
    # ... and those are right: checked against values computed here (tabulated t quantile)
    a = reader.cells[("resnet20", "mobilenet", "kd")]
    assert a == {"mean": "73.00", "std": "1.00", "delta": "+2.00",
                 "ci-low": f"{2 - T975_2 / math.sqrt(3):+.2f}", "ci-high": f"{2 + T975_2 / math.sqrt(3):+.2f}"}
    assert (a["ci-low"], a["ci-high"]) == ("-0.48", "+4.48")
    att = reader.cells[("resnet20", "mobilenet", "attention")]
    assert (att["delta"], att["ci-low"], att["ci-high"]) == ("+4.00", "+1.52", "+6.48")
    assert reader.cells[("wrn40_1", "wrn16_1", "kd")]["mean"] == "92.00"  # the failed seed is left out

    # one figure each: gains, 2 per pair (top-1 and loss curves), size, ours against the reference
    assert page.count("<svg") == 1 + 2 * 2 + 1 + 1
    assert len(set(re.findall(r'\bid="([^"]+)"', page))) == len(re.findall(r'\bid="([^"]+)"', page))  # unique ids
    # failures, budget, data, environment
    assert "wrn40_1 → wrn16_1 kd seed 2" in page and "Loss became non-finite" in page
    assert "3 epochs, 500 images" in page and "500 / 0 / 200" in page
    for value in ("Test CPU 9000", "bfloat16", "2.99"):
        assert value in page
    assert "Test et al. 2099, Table 1" in page
    # the summary names the gain whose interval excludes zero (attention) and not the other (kd)
    findings = page[page.index('class="findings"'):page.index("</ul>", page.index('class="findings"'))]
    assert "attention (+4.00)" in findings and "kd (+2.00)" not in findings


def test_learning_curves_are_the_mean_and_range_over_seeds(store):
    from kdzoo import report_plots as plots

    runs = [r for r in store.runs() if isinstance(r, RunRecord) and r.model == "mobilenet" and r.variant == "kd"]
    curves = html_report._curves(runs, plots)
    assert curves.top1.x == [1.0, 2.0, 3.0] and curves.top1.n == 3
    assert curves.top1.mean == pytest.approx([73 - 4, 73 - 1, 73])  # kd's finals 72, 74, 73: mean 73
    assert curves.top1.low == [68, 71, 72] and curves.top1.high == [70, 73, 74]
    assert curves.loss["ce"].mean == pytest.approx([2.0, 1.0, 2 / 3]) and curves.loss["ce"].x == [1.0, 2.0, 3.0]
    assert curves.loss["hint"].x == [0.0]  # the init-stage epoch sits before main epoch 1, and is not evaluated


def test_without_matplotlib_the_text_reports_are_still_written(store, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.delitem(sys.modules, "kdzoo.report_plots", raising=False)
    monkeypatch.delattr(kdzoo, "report_plots", raising=False)  # else `from kdzoo import report_plots` finds it
    assert not html_report.available()
    cli.report(store, "last", export=True)  # the end of `kdzoo bench`: one line saying how to get the page
    out = capsys.readouterr().out
    assert 'pip install "kdzoo[report]"' in out and (store.root / "report.json").is_file()
    assert not (store.root / "report.html").exists()
    (store.root / "report.json").unlink()
    assert cli.main(["report", str(store.root), "--html"]) == 2  # asked for explicitly: an error, after the exports
    err = capsys.readouterr().err
    assert 'pip install "kdzoo[report]"' in " ".join(err.split()) and (store.root / "report.json").is_file()
    assert not (store.root / "report.html").exists()


# -- headless Chromium ---------------------------------------------------------------------------
class Chromium:
    """Headless Chromium driven through the DevTools protocol over ``--remote-debugging-pipe`` (JSON messages
    ending in NUL on fds 3 and 4): no extra package, no port."""

    def __init__(self, profile: Path, binary: str = "chromium") -> None:
        to_r, self._w = os.pipe()
        self._r, from_w = os.pipe()
        # high numbers first, so that moving them onto 3 and 4 in the child cannot clobber one another
        a, b = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
        os.close(to_r), os.close(from_w)
        args = [binary, "--headless=new", "--remote-debugging-pipe", "--no-first-run", "--disable-gpu",
                "--hide-scrollbars", "--disable-extensions", f"--user-data-dir={profile}", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run its sandbox as root (containers, CI)
        self.proc = subprocess.Popen(args, close_fds=False, preexec_fn=lambda: (os.dup2(a, 3), os.dup2(b, 4)),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(a), os.close(b)
        self._buf, self._id, self.events = b"", 0, []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def _message(self, timeout: float) -> dict:
        while b"\0" not in self._buf:
            if not select.select([self._r], [], [], max(0.0, timeout))[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe (it exited)")
            self._buf += chunk
        message, self._buf = self._buf.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, page: bool = False, timeout: float = 60) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if page:
            message["sessionId"] = self.session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        while True:
            m = self._message(timeout)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def wait_for(self, event: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._message(deadline - time.monotonic()))

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, page=True)["result"]["value"]

    def open(self, path: Path, width: int = 1280) -> None:
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", page=True)
        self.resize(width, 900)
        self.send("Page.navigate", {"url": path.resolve().as_uri()}, page=True)
        self.wait_for("Page.loadEventFired")

    def resize(self, width: int, height: int) -> None:
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, page=True)

    def screenshot(self, max_height: int | None = None) -> bytes:
        """A PNG of the whole page (or its top ``max_height`` pixels)."""
        height = self.evaluate("document.documentElement.scrollHeight")
        width = self.evaluate("document.documentElement.clientWidth")
        self.resize(width, min(height, max_height or height))
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"}, page=True)["data"])

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w), os.close(self._r)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; without it the browser test fails in CI (KDZOO_REQUIRE_DATA=1) and skips elsewhere."""
    found = shutil.which("chromium")
    if found:
        return found
    why = "no `chromium` on PATH (Debian: apt-get install chromium; .ci/run installs it)"
    if os.environ.get("KDZOO_REQUIRE_DATA") == "1":
        pytest.fail(f"KDZOO_REQUIRE_DATA=1 but {why}: the HTML report's browser test cannot run")
    pytest.skip(why)


TINY = {
    "name": "tiny-html", "description": "two methods, two seeds, two epochs on 500 real CIFAR-10 images",
    "data": {"train_size": 500, "test_size": 500}, "seeds": [0, 1],
    "recipe": {"epochs": 2, "batch_size": 50, "lr": 0.05, "eval_batch_size": 500},
    "teacher_recipe": {"epochs": 2}, "teachers": ["resnet8"], "students": ["resnet8"], "methods": ["kd"],
    "reference": {"source": "numbers made up for this test", "metric": "top1",
                  "rows": [{"teacher": "resnet8", "student": "resnet8", "values": {"ce": 20.0, "kd": 22.0}}]},
}


@pytest.fixture(scope="module")
def tiny_bench(cifar_path, tmp_path_factory) -> Path:
    """The folder of a real `kdzoo bench` run (which writes report.html at its end)."""
    root = tmp_path_factory.mktemp("html-bench")
    (root / "b.yaml").write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "KDZOO_CACHE": str(root / "cache"), "KDZOO_DATA": cifar_path, "COLUMNS": "160"}
    proc = subprocess.run([sys.executable, "-m", "kdzoo.cli", "bench", str(root / "b.yaml"), "--out", str(root / "out")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "report.html" in proc.stdout
    return root / "out"


def _not_blank(png: Path, box: dict) -> tuple[float, int]:
    """(share of pixels that differ from the page's white, distinct colours) inside ``box`` of the screenshot."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        region = np.asarray(im.convert("RGB").crop((round(box["x"]), round(box["y"]),
                                                    round(box["x"] + box["w"]), round(box["y"] + box["h"]))))
    pixels = region.reshape(-1, 3)
    inked = int((pixels.min(axis=1) < 235).sum())
    return inked / max(1, len(pixels)), len(np.unique(pixels, axis=0))


def test_a_browser_renders_a_real_benchmark_page(tiny_bench, chromium, tmp_path):
    page = tiny_bench / "report.html"
    report = json.loads((tiny_bench / "report.json").read_text())
    assert all(c["mean"] > 14 for c in report["cells"])  # real data: well above chance (10%) after 2 epochs
    browser = Chromium(tmp_path / "profile", chromium)
    try:
        browser.open(page)
        cells = browser.evaluate("""[...document.querySelectorAll('td[data-variant]')].map(td => {
            const o = {key: [td.dataset.teacher, td.dataset.student, td.dataset.variant]};
            td.querySelectorAll('span').forEach(s => { if (s.className) o[s.className] = s.textContent; });
            return o; })""")
        plots = browser.evaluate("""[...document.querySelectorAll('svg.plot')].map(s => {
            const r = s.getBoundingClientRect();
            return {x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height}; })""")
        shot = tmp_path / "report.png"
        shot.write_bytes(browser.screenshot())
    finally:
        browser.close()
    print(f"\nscreenshot of {page}: {shot}")

    errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert", "warning"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] in ("error", "warning"))]
    assert not errors, errors
    requests = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert requests == [page.resolve().as_uri()], requests  # the page itself, nothing else

    fields = TableReader.FIELDS
    shown = {tuple(c["key"]): {k: v for k, v in c.items() if k in fields} for c in cells}
    assert shown == expected_texts(report) and len(shown) == 2  # ce and kd of the one pair

    assert len(plots) == 1 + 2 + 1 + 1  # gains, top-1 and loss curves, size, ours against the reference
    for box in plots:
        assert box["w"] > 300 and box["h"] > 150, box
        inked, colours = _not_blank(shot, box)
        assert inked > 0.01 and colours > 8, (box, inked, colours)


def main(argv: list[str]) -> int:
    """``python tests/test_html_report.py REPORT.html OUT.png [MAX_HEIGHT]``: a screenshot 1280 pixels wide
    (the top MAX_HEIGHT pixels, default 2600), reduced to 256 colours to stay small."""
    import tempfile

    from PIL import Image

    if len(argv) not in (2, 3):
        print(main.__doc__)
        return 2
    page, out = Path(argv[0]), Path(argv[1])
    with tempfile.TemporaryDirectory() as profile:
        browser = Chromium(Path(profile), shutil.which("chromium") or "chromium")
        try:
            browser.open(page)
            png = browser.screenshot(int(argv[2]) if len(argv) == 3 else 2600)
        finally:
            browser.close()
    raw = Path(profile + ".png")
    raw.write_bytes(png)
    with Image.open(raw) as im:
        im.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(out, optimize=True)
    raw.unlink()
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
