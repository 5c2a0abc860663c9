"""The dashboard in a real browser (Debian's chromium, driven by Selenium through
chromium-driver) against a real ``jobspine serve`` process, killed with SIGKILL and restarted.

It also runs the page's protocol client (``conn.js``) against a scripted socket, to check the
client rules of PROTOCOL.md section 4 message by message.

Screenshots of every view go to ``tests/artifacts/dashboard/`` (git-ignored);
``JOBSPINE_DOCS_SCREENSHOT=1`` also refreshes ``docs/dashboard.png`` (1280x800) for the README.
Run alone: ``.venv/bin/python -m pytest tests/test_dashboard_browser.py -p no:randomly``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson
import pytest
import trio
from trio_websocket import open_websocket_url

from transport import mint_token

from .serving import free_port

ROOT = Path(__file__).parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts" / "dashboard"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCRIPT = Path(sys.executable).with_name("jobspine")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "transport._cli"]

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    if os.environ.get("CI"):
        pytest.fail("CI must install chromium and chromium-driver (.ci/run does)")
    pytest.skip(
        "needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402 - only once the browser is known to be there
from selenium.common.exceptions import (  # noqa: E402
    ElementClickInterceptedException,
    ElementNotInteractableException,
    StaleElementReferenceException,
)
from selenium.webdriver import Chrome as WebDriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

T = TypeVar("T")


class Server:
    """``jobspine serve`` in a process of its own, on fixed ports so it can be restarted."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.port = free_port()
        self.http = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data / "serve.log"
        data.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        env = {**os.environ, "JOBSPINE_DATA": str(self.data), "PYTHONPATH": str(ROOT)}
        env.pop("JOBSPINE_SECRET", None)
        return env

    def start(self) -> None:
        starts = self.log.read_text().count("listening on") if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*COMMAND, "serve", "--port", str(self.port), "--health-port", str(self.http),
                 "--stop-grace", "0.5", "--handlers", "tests.cli_handlers:HANDLERS"],
                env=self.env(), stdout=log, stderr=log, cwd=ROOT,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while self.log.read_text().count("listening on") == starts:
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def token(self, user: str, *, admin: bool = False, ttl: float = 3600) -> str:
        secret = (self.data / "secret").read_text().strip()
        return mint_token(secret, user, admin=admin, ttl=ttl)

    @property
    def page(self) -> str:
        return f"http://127.0.0.1:{self.http}/"

    def durable_log(self, token: str, job_id: str) -> list[dict[str, Any]]:
        """The job's events, read through the protocol from sequence 1 (the durable log)."""
        return trio.run(_read_log, f"ws://127.0.0.1:{self.port}", token, job_id)

    def wait_final(self, token: str, job_id: str) -> list[dict[str, Any]]:
        """The durable log once the job has ended."""
        deadline = time.monotonic() + 30
        while (log := self.durable_log(token, job_id))[-1]["type"] not in (
            "completed", "failed", "cancelled"
        ):  # fmt: skip
            assert time.monotonic() < deadline, log[-1]
            time.sleep(0.1)
        return log

    def request(self, token: str, op: str, fields: dict[str, Any]) -> Any:
        return trio.run(_request, f"ws://127.0.0.1:{self.port}", token, op, fields)

    def create(self, token: str, kind: str, input: Any) -> dict[str, Any]:
        job: dict[str, Any] = self.request(token, "create", {"kind": kind, "input": input})
        return job


async def _exchange(url: str, token: str, frames: list[dict[str, Any]], done: Callable[
        [list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:  # fmt: skip
    received: list[dict[str, Any]] = []
    with trio.fail_after(20):
        async with open_websocket_url(url) as ws:
            await ws.send_message(orjson.dumps({"op": "hello", "id": 0, "token": token}).decode())
            hello = orjson.loads(await ws.get_message())
            assert hello["type"] == "reply", hello
            for frame in frames:
                await ws.send_message(orjson.dumps(frame).decode())
            while not done(received):
                message = orjson.loads(await ws.get_message())
                received.extend(message["messages"] if message["type"] == "batch" else [message])
    return [hello, *received]


async def _read_log(url: str, token: str, job_id: str) -> list[dict[str, Any]]:
    epoch: list[str] = []

    def done(got: list[dict[str, Any]]) -> bool:
        replies = [m for m in got if m.get("id") == 1]
        if not replies:
            return False
        assert replies[0]["type"] == "reply", replies[0]
        events = [m for m in got if m["type"] in ("event", "skipped")]
        return len(events) >= int(replies[0]["result"]["head"])

    async with open_websocket_url(url) as ws:  # the epoch first
        await ws.send_message(orjson.dumps({"op": "hello", "id": 0, "token": token}).decode())
        epoch.append(orjson.loads(await ws.get_message())["result"]["epoch"])
    subscribe = {"op": "subscribe", "id": 1, "room": f"job:{job_id}",
                 "cursor": {"epoch": epoch[0], "seq": 0}}  # fmt: skip
    got = await _exchange(url, token, [subscribe], done)
    return [m["event"] for m in got if m["type"] == "event"]


async def _request(url: str, token: str, op: str, fields: dict[str, Any]) -> Any:
    frame = {"op": op, "id": 1, **fields}
    got = await _exchange(url, token, [frame], lambda g: any(m.get("id") == 1 for m in g))
    reply = next(m for m in got if m.get("id") == 1 and m["type"] in ("reply", "error"))
    assert reply["type"] == "reply", reply
    return reply["result"]


# -- the browser -------------------------------------------------------------------------------


def browser(scratch: Path) -> WebDriver:
    """Chromium, headless, its profile and temporary files (a singleton socket it leaves
    behind in ``/tmp``) under ``scratch``."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,800"):  # fmt: skip
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={scratch / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(str(CHROMEDRIVER), env={**os.environ, "TMPDIR": str(scratch)})
    driver = webdriver.Chrome(service=service, options=options)
    size(driver, 1280, 800)
    return driver


def size(driver: WebDriver, width: int, height: int) -> None:
    """The page's viewport, exactly (the window's outer size would include the frame)."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
    )


def wait(driver: WebDriver, condition: Callable[[WebDriver], T | None], seconds: float = 20) -> T:
    """The first true value of ``condition`` within ``seconds``."""
    return cast(T, WebDriverWait(driver, seconds, poll_frequency=0.05).until(condition))


def js(driver: WebDriver, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def progress(driver: WebDriver) -> float:
    return float(js(driver, "return document.getElementById('detail-progress').value"))


def editor_open(driver: WebDriver) -> WebElement | None:
    return by_id(driver, "restart-mods") if by_id(driver, "restart-editor").is_displayed() else None


def by_id(driver: WebDriver, element_id: str) -> WebElement:
    return driver.find_element(By.ID, element_id)


def text(driver: WebDriver, element_id: str) -> str:
    """The element's rendered text, read in one step (the page redraws as events come)."""
    found = js(
        driver,
        "const e = document.getElementById(arguments[0]); return e ? e.innerText : null",
        element_id,
    )
    assert found is not None, f"no element #{element_id}"
    return str(found)


def shot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def timeline(driver: WebDriver) -> list[tuple[int, str]]:
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#timeline-body tr')]"
        ".map(r => [Number(r.dataset.seq), r.dataset.type])"
    )
    return [(int(seq), kind) for seq, kind in rows]


def focused_job(driver: WebDriver) -> str | None:
    """The id of the job the page shows."""
    found = js(driver, "return JSON.parse(sessionStorage.getItem('jobspine.focus'))")
    return str(found) if found else None


def page_errors(driver: WebDriver) -> list[str]:
    """Script errors the page logged (failed websocket connections are expected here)."""
    logged: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [
        entry["message"]
        for entry in logged
        if entry["level"] == "SEVERE" and "WebSocket" not in entry["message"]
    ]


def open_job(driver: WebDriver, job_id: str) -> None:
    """Opens a job from the list, as a person would."""
    selector = f"#jobs-body tr[data-job='{job_id}'] button"
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, selector))[0].click()
    wait(driver, lambda d: focused_job(d) == job_id)


def live(driver: WebDriver) -> bool:
    return by_id(driver, "statusbar").get_attribute("data-state") == "live"


def open_admin(driver: WebDriver) -> None:
    """Click the admin tab once the page shows it: live comes with the welcome, and the tab
    appears as the page renders the welcome's ``admin`` (not necessarily at the same time)."""
    wait(driver, lambda d: by_id(d, "nav-admin").is_displayed())
    by_id(driver, "nav-admin").click()


def rows_of(job_id: str) -> Callable[[WebDriver], list[WebElement]]:
    return lambda d: d.find_elements(By.CSS_SELECTOR, f"#admin-body tr[data-job='{job_id}']")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    served = Server(tmp_path / "data")
    served.start()
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    d = browser(tmp_path_factory.mktemp("chromium"))
    try:
        yield d
    finally:
        d.quit()


# -- scenarios ---------------------------------------------------------------------------------


def test_job_survives_reload_and_server_kill(server: Server, driver: WebDriver) -> None:
    """Sign in (token in the fragment), submit a research job from the UI, watch it; reload
    mid-job (the timeline continues from its saved cursor: no duplicate, no gap); SIGKILL the
    server (StatusBar: lost); restart it (RecoveryToast, Resume, completed); the timeline then
    equals the durable event log exactly, and the DebugPanel shows the last checkpoint."""
    alice = server.token("alice")
    driver.get(f"{server.page}#token={alice}")
    wait(driver, live)
    assert driver.current_url == server.page  # the fragment is gone from the address bar
    stored = js(driver, "return JSON.parse(sessionStorage.getItem('jobspine.token'))")
    assert stored == alice

    kind = by_id(driver, "submit-kind")
    kind.clear()
    kind.send_keys("research")
    source = by_id(driver, "submit-input")
    source.clear()
    source.send_keys(json.dumps({"query": "dashboard", "depth": 300, "delay": 0.04}))
    by_id(driver, "submit-button").click()
    job_id = wait(driver, focused_job)
    wait(driver, lambda d: len(timeline(d)) >= 20)
    first = progress(driver)
    wait(driver, lambda d: progress(d) > first)
    shot(driver, "1-job-running")

    # A reload mid-job: the room continues after the saved cursor.
    driver.refresh()
    wait(driver, live)
    continued = int(wait(driver, lambda d: by_id(d, "timeline-count").get_attribute(
        "data-continued-from")))  # fmt: skip
    assert continued >= 20
    wait(driver, lambda d: len(timeline(d)) > continued + 10)
    seqs = [seq for seq, _ in timeline(driver)]
    assert seqs == list(range(1, len(seqs) + 1))

    # SIGKILL: the StatusBar says the connection is lost and counts down to the next try.
    server.kill()
    wait(driver, lambda d: "reconnecting in" in text(d, "conn-state"))
    assert "connection lost (close 1006)" in text(driver, "conn-state")
    assert by_id(driver, "reconnect").is_displayed()
    shot(driver, "2-connection-lost")
    before = len(timeline(driver))

    server.start()
    wait(driver, lambda d: by_id(d, "reconnect").is_enabled())
    # "Reconnect now" rather than wait for the backoff, unless the page's own retry got there
    # first and hid the button (a race with the backoff timer, not a fault).
    with contextlib.suppress(
        ElementClickInterceptedException,  # hidden just now: another element is under it
        ElementNotInteractableException,
        StaleElementReferenceException,
    ):
        by_id(driver, "reconnect").click()
    wait(driver, live, 30)
    toast = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f".toast[data-job='{job_id}']"))
    assert "paused by recovery" in toast[0].text
    assert "Paused by recovery" in wait(driver, lambda d: text(d, "error-banner"))
    shot(driver, "3-recovery-toast")
    toast[0].find_element(By.CSS_SELECTOR, "button.resume").click()
    wait(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, ".toast"))
    wait(driver, lambda d: by_id(d, "detail-state").text == "completed", 60)

    log = server.durable_log(alice, job_id)
    wait(driver, lambda d: len(timeline(d)) == len(log))
    assert timeline(driver) == [(e["seq"], e["type"]) for e in log]
    types = [e["type"] for e in log]
    assert "recovery" in types and "resumed" in types and types[-1] == "completed"
    assert len(timeline(driver)) > before
    resumed = next(e for e in log if e["type"] == "resumed")
    row = driver.find_element(By.CSS_SELECTOR, f"#timeline-body tr[data-seq='{resumed['seq']}']")
    assert "alice" in row.text  # who caused it
    shot(driver, "4-timeline-completed")
    driver.execute_script("document.getElementById('debug').scrollIntoView()")
    version = max(e["data"]["version"] for e in log if e["type"] == "checkpoint")
    wait(driver, lambda d: text(d, "debug-version") == str(version))
    assert "valid" in text(driver, "debug-body")
    shot(driver, "5-debug-panel")

    # A completed job cannot be restarted: the action is disabled.
    driver.execute_script("window.scrollTo(0, 0)")
    assert not by_id(driver, "act-restart").is_enabled()  # a completed job cannot be restarted
    assert page_errors(driver) == []


def test_server_on_a_new_database_resets_the_page(
    server: Server, driver: WebDriver, tmp_path: Path
) -> None:
    """The server comes back on another database (a new epoch): the page drops every job of
    the old one and closes the focused job's timeline, saying why, live and after a reload;
    nothing of the two databases is shown together."""
    alice = server.token("alice")
    old = server.create(alice, "endless", {})
    driver.get(f"{server.page}#token={alice}")
    wait(driver, live)
    open_job(driver, old["id"])
    wait(driver, lambda d: len(timeline(d)) >= 5)

    server.kill()
    moved = Server(tmp_path / "other")
    moved.port, moved.http = server.port, server.http
    shutil.copy(server.data / "secret", moved.data / "secret")  # the same token still signs in
    moved.start()
    try:
        new = moved.create(alice, "failing", {})
        wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"tr[data-job='{new['id']}']"))
        wait(driver, lambda d: focused_job(d) is None)
        assert old["id"] not in text(driver, "jobs-body")
        assert text(driver, "jobs-count") == "1 of 1 jobs"
        assert timeline(driver) == []
        notice = text(driver, "notice")
        assert "epoch_changed" in notice and "no longer on this server" in notice
        shot(driver, "12-new-database")

        # A tab that still holds the old focus and cursors when it reloads: the same.
        js(driver, "sessionStorage.setItem('jobspine.focus', JSON.stringify(arguments[0]))",
           old["id"])  # fmt: skip
        driver.refresh()
        wait(driver, live)
        # The stored focus is dropped once the server says the job is not there: the notice
        # says so (before that answer the page may show no focus and no notice yet).
        wait(driver, lambda d: "no longer on this server" in text(d, "notice"))
        assert focused_job(driver) is None
        assert old["id"] not in text(driver, "jobs-body") and timeline(driver) == []
        assert page_errors(driver) == []
    finally:
        moved.stop()


#: Job data meant to be read as markup, a URL, a template, or to reorder the words around it.
HOSTILE = [
    "<img src=x onerror=window.__pwned=1>",
    "</script><script>window.__pwned=2</script>",
    "javascript:window.__pwned=3",
    '"><svg onload=window.__pwned=4>',
    "${window.__pwned=5}{{constructor.constructor('window.__pwned=6')()}}",
    "\u202eevil\u202c gpj.exe \u2067x\u200f\u200b\ufeff",
    "emoji 👩‍👩‍👧‍👦🧨 and a long word " + "W" * 3000,
]


def test_hostile_job_data_is_shown_as_text(server: Server, driver: WebDriver) -> None:
    """User ids, inputs, results, checkpoint samples and error messages holding markup,
    scripts, URLs, bidirectional overrides and very long words: nothing is parsed or run, an
    override reorders only its own text, long words wrap (nothing sideways at 1280 px or
    390 px), and every field of the job is listed."""
    user = HOSTILE[0] + HOSTILE[5]
    token = server.token(user)
    words = " ".join(HOSTILE)
    analysis = server.create(token, "analysis", {"content": words, "chunk_size": 50, "delay": 0})
    research = server.create(token, "research", {"query": words[:1000], "depth": 2, "delay": 0})
    failing = server.create(token, "failing", {"labels": HOSTILE, HOSTILE[0]: HOSTILE[1],
                                               "numbers": [1e308, -0.0, 5e-324]})  # fmt: skip
    driver.get(f"{server.page}#token={token}")
    wait(driver, live)
    for job in (analysis, research, failing):
        open_job(driver, job["id"])
        wait(driver, lambda d: timeline(d) and timeline(d)[-1][1] in ("completed", "failed"))
        js(driver, "document.querySelectorAll('details').forEach((e) => { e.open = true; })")
        wait(driver, lambda d: "loading" not in text(d, "debug-body"))
        assert "[object" not in text(driver, "fields")
        assert "user_id" in text(driver, "fields") and "input" in text(driver, "fields")
        for width in (1280, 390):
            size(driver, width, 800)
            assert js(driver, "return document.documentElement.scrollWidth") <= width
        size(driver, 1280, 800)
    shot(driver, "13-hostile-data")
    assert js(driver, "return window.__pwned") is None
    assert js(driver, "return document.querySelectorAll('#app img, #app svg, script').length") == 1
    # Each override is closed where the user's text ends (U+2069), before the page's words.
    assert "\u2069, token valid" in text(driver, "who")
    assert f"\u2068{user}\u2069" in text(driver, "fields")
    assert page_errors(driver) == []


def test_a_job_with_thousands_of_events(server: Server, driver: WebDriver) -> None:
    """A job with over a thousand events, watched live: the page keeps answering, its timeline
    keeps the newest 1,000 in order and says how many it left out, and a reload continues
    with the same bound."""
    alice = server.token("alice")
    driver.get(f"{server.page}#token={alice}")
    wait(driver, live)
    job = server.create(alice, "research", {"query": "many", "depth": 600, "delay": 0})
    open_job(driver, job["id"])
    deadline = time.monotonic() + 120
    while server.request(alice, "get", {"job_id": job["id"]})["state"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    log = server.durable_log(alice, job["id"])
    assert len(log) > 1100
    wait(driver, lambda d: timeline(d) and timeline(d)[-1] == (log[-1]["seq"], "completed"), 60)
    rows = timeline(driver)
    assert len(rows) == 1000
    assert [seq for seq, _ in rows] == sorted({seq for seq, _ in rows})  # in order, once each
    dropped = int(by_id(driver, "timeline-count").get_attribute("data-dropped") or 0)
    assert dropped > 0 and "earlier left out" in text(driver, "timeline-count")
    driver.refresh()
    wait(driver, live)
    wait(driver, lambda d: timeline(d) and timeline(d)[-1][0] == log[-1]["seq"])
    assert len(timeline(driver)) == 1000
    assert page_errors(driver) == []


def test_admin_view_says_what_it_leaves_out(server: Server, driver: WebDriver) -> None:
    """More jobs than the admin view lists (200, newest first): it says so and how many there
    are; a state filter narrows the list on the server, down to jobs the first page missed."""
    erin = server.token("erin")
    oldest = server.create(erin, "research", {"query": "first", "depth": 1, "delay": 0})
    for start in range(0, 210, 10):  # in rounds, under the requests a connection may have
        frames = [{"op": "create", "id": i, "kind": "failing", "input": {}}
                  for i in range(start + 1, start + 11)]  # fmt: skip
        got = trio.run(_exchange, f"ws://127.0.0.1:{server.port}", erin, frames,
                       lambda g: sum(m["type"] in ("reply", "error") for m in g) >= 10)  # fmt: skip
        assert all(m["type"] != "error" for m in got), got
    driver.get(f"{server.page}#token={server.token('root', admin=True)}")
    wait(driver, live)
    open_admin(driver)
    shown = wait(driver, lambda d: text(d, "admin-shown"))
    assert "200 newest jobs of 211" in shown and "older" in shown
    assert len(driver.find_elements(By.CSS_SELECTOR, "#admin-body tr")) == 200
    assert not rows_of(oldest["id"])(driver)
    by_id(driver, "admin-state").send_keys("completed")
    by_id(driver, "admin-form").submit()
    wait(driver, rows_of(oldest["id"]))
    assert text(driver, "admin-shown") == "1 job"
    shot(driver, "14-admin-many")
    # Keyboard focus on a row stays there through redraws and the 5 s refresh.
    opener = rows_of(oldest["id"])(driver)[0].find_element(By.TAG_NAME, "button")
    js(driver, "arguments[0].focus()", opener)
    time.sleep(5.5)
    assert driver.switch_to.active_element == opener
    opener.send_keys(Keys.ENTER)
    wait(driver, lambda d: focused_job(d) == oldest["id"])
    assert page_errors(driver) == []


def test_a_new_token_in_an_open_tab(server: Server, driver: WebDriver) -> None:
    """A signed-in URL for another user opened in a tab that shows the page (only the fragment
    changes, no page load): the tab signs in as that user with nothing of the first one (its
    focused job, timeline); the fragment leaves the address bar, an empty one too."""
    alice = server.token("alice")
    job = server.create(alice, "research", {"query": "alice's", "depth": 2, "delay": 0})
    driver.get(f"{server.page}#token={alice}")
    wait(driver, live)
    open_job(driver, job["id"])
    wait(driver, lambda d: timeline(d) and timeline(d)[-1][1] == "completed")

    driver.get(f"{server.page}#token={server.token('bob')}")
    wait(driver, lambda d: "bob" in text(d, "who"))
    wait(driver, live)
    assert driver.current_url == server.page
    assert focused_job(driver) is None and timeline(driver) == []
    assert job["id"] not in driver.page_source
    assert js(driver, "return sessionStorage.getItem('jobspine.timeline')") is None

    for junk in ("#token=", "#token=%20&x=1"):
        driver.get(f"{server.page}{junk}")
        wait(driver, lambda d: d.current_url == server.page)
        assert "bob" in text(driver, "who")
    assert page_errors(driver) == []


def test_restart_editor_failure_banner_and_keyboard(server: Server, driver: WebDriver) -> None:
    """A failed job shows the ErrorBanner with what can be done; the restart editor sends the
    modifications; every step is done by keyboard; views at phone width."""
    alice = server.token("alice")
    failed = server.create(alice, "failing", {"n": 1})
    driver.get(f"{server.page}#token={alice}")
    wait(driver, live)
    opener = wait(driver, lambda d: d.find_element(
        By.CSS_SELECTOR, f"tr[data-job='{failed['id']}'] button"))  # fmt: skip
    opener.send_keys(Keys.ENTER)  # a job opens from the keyboard
    banner = wait(driver, lambda d: text(d, "error-banner"))
    assert "RuntimeError: failed on purpose" in banner
    wait(driver, lambda d: "only a restart" in text(d, "error-banner"))
    shot(driver, "6-error-banner")

    button = by_id(driver, "act-restart")
    button.send_keys(Keys.ENTER)
    editor = wait(driver, editor_open)
    assert driver.switch_to.active_element == editor
    editor.send_keys(Keys.ESCAPE)
    wait(driver, lambda d: not by_id(d, "restart-editor").is_displayed())
    assert driver.switch_to.active_element == button  # focus goes back where it was
    button.send_keys(Keys.ENTER)
    editor = wait(driver, editor_open)
    editor.clear()
    editor.send_keys('{"n": 2}')
    shot(driver, "7-restart-editor")
    by_id(driver, "restart-apply").send_keys(Keys.ENTER)
    wait(driver, lambda d: any(kind == "restarted" for _, kind in timeline(d)))
    log = server.durable_log(alice, failed["id"])
    restarted = next(e for e in log if e["type"] == "restarted")
    assert restarted["data"]["input"] == {"n": 2} and restarted["actor"] == "alice"
    wait(driver, lambda d: timeline(d)[-1][1] == "failed")

    size(driver, 390, 844)
    driver.execute_script("window.scrollTo(0, 0)")
    shot(driver, "8-phone-job")
    width = driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= 390  # nothing sideways at phone width
    assert page_errors(driver) == []


def test_users_admin_expiry_and_bounded_list(server: Server, driver: WebDriver) -> None:
    """A second user sees none of the first user's jobs; an admin sees everyone's; an expired
    token (pasted, or expiring while open) leads back to sign-in; old finished jobs leave the
    list past 50."""
    alice = server.token("alice")
    mine = server.create(alice, "research", {"query": "mine", "depth": 2, "delay": 0})

    driver.get(server.page)  # no token: the sign-in form
    wait(driver, lambda d: by_id(d, "signin").is_displayed())
    shot(driver, "9-sign-in")
    by_id(driver, "signin-token").send_keys(server.token("bob"))
    by_id(driver, "signin-submit").click()
    wait(driver, live)
    wait(driver, lambda d: "bob" in text(d, "who"))
    time.sleep(0.5)  # the list reply and any event would have come by now
    assert mine["id"] not in driver.page_source
    assert text(driver, "jobs-count") == "0 of 0 jobs"
    assert not by_id(driver, "nav-admin").is_displayed()

    # An admin sees alice's job in the admin view.
    by_id(driver, "signout").click()
    wait(driver, lambda d: by_id(d, "signin").is_displayed())
    by_id(driver, "signin-token").send_keys(server.token("root", admin=True))
    by_id(driver, "signin-submit").click()
    wait(driver, live)
    open_admin(driver)
    wait(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, f"#admin-body tr[data-job='{mine['id']}']"),
    )
    assert "alice" in text(driver, "admin-body")
    shot(driver, "10-admin")

    # ... and can open it: its timeline, read from alice's job room.
    def open_it(d: WebDriver) -> bool:
        try:
            rows_of(mine["id"])(d)[0].find_element(By.TAG_NAME, "button").click()
        except StaleElementReferenceException:
            return False  # the table is redrawn every 500 ms: found, then replaced
        return True

    wait(driver, open_it)
    wait(driver, lambda d: timeline(d) and timeline(d)[-1][1] == "completed")

    # Bounded memory: 60 finished jobs, 50 kept in the live list.
    carol = server.token("carol")
    jobs = [server.create(carol, "research", {"query": f"q{i}", "depth": 1, "delay": 0})
            for i in range(60)]  # fmt: skip
    deadline = time.monotonic() + 30
    while (stats := server.request(carol, "my_stats", {})).get("completed", 0) < len(jobs):
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    by_id(driver, "signout").click()
    by_id(driver, "signin-token").send_keys(carol)
    by_id(driver, "signin-submit").click()
    wait(driver, live)
    wait(driver, lambda d: text(d, "jobs-count") == "50 of 50 jobs")
    assert "alice" not in text(driver, "app")  # nothing of the admin's session is left

    # A token that expires while the page is open leads back to sign-in.
    by_id(driver, "signout").click()
    by_id(driver, "signin-token").send_keys(server.token("dave", ttl=2))
    by_id(driver, "signin-submit").click()
    wait(driver, live)
    wait(driver, lambda d: by_id(d, "signin").is_displayed(), 15)
    assert "expired" in text(driver, "signin-message")
    assert driver.execute_script("return sessionStorage.getItem('jobspine.token')") is None
    shot(driver, "11-token-expired")

    # A token that has already expired: refused at once, back to sign-in.
    by_id(driver, "signin-token").send_keys(server.token("dave", ttl=-60))
    by_id(driver, "signin-submit").click()
    wait(driver, lambda d: by_id(d, "signin").is_displayed() and text(d, "signin-message"))
    assert page_errors(driver) == []


def test_jobspine_ui_opens_the_page_signed_in(
    server: Server, driver: WebDriver, tmp_path: Path
) -> None:
    """``jobspine ui`` hands the browser the token in the URL fragment only, and through a
    one-use local address, never on the browser's command line (where every local user could
    read it): the page is signed in, the address bar is clean, and the token is in no server
    log. The address, used once, opens nothing."""
    opened = tmp_path / "opened"
    fake = tmp_path / "browser.sh"
    fake.write_text(f'#!/bin/sh\nprintf %s "$1" > {opened}.part && mv {opened}.part {opened}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    alice = server.token("alice")
    env = {**server.env(), "JOBSPINE_TOKEN": alice, "BROWSER": str(fake)}
    args = ["ui", "--url", f"ws://127.0.0.1:{server.port}", "--health-port", str(server.http)]
    printed = subprocess.run([*COMMAND, *args, "--print-url"], env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
    url = printed.stdout.strip()
    assert url == f"{server.page}#token={alice}"
    with subprocess.Popen([*COMMAND, *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as ui:  # fmt: skip
        deadline = time.monotonic() + 30
        while not opened.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        one_use = opened.read_text()
        assert one_use.startswith("http://127.0.0.1:") and alice not in one_use
        driver.get(one_use)  # the browser asks: redirected to the signed-in page
        out, err = ui.communicate(timeout=30)
    assert ui.returncode == 0, err
    assert alice not in out + err
    wait(driver, live)
    assert driver.current_url == server.page
    assert "alice" in text(driver, "who")
    driver.get(server.page)  # a reload in the same tab stays signed in
    wait(driver, live)
    assert alice not in server.log.read_text()

    # Two tabs keep their own focus and cursors (sessionStorage is per tab).
    one = server.create(alice, "research", {"query": "one", "depth": 2, "delay": 0})
    two = server.create(alice, "research", {"query": "two", "depth": 2, "delay": 0})
    first_tab = driver.current_window_handle
    open_job(driver, one["id"])
    driver.switch_to.new_window("tab")
    driver.get(url)
    wait(driver, live)
    open_job(driver, two["id"])
    driver.switch_to.window(first_tab)
    driver.refresh()
    wait(driver, live)
    assert focused_job(driver) == one["id"]
    wait(driver, lambda d: timeline(d) and timeline(d)[-1][1] == "completed")

    if os.environ.get("JOBSPINE_DOCS_SCREENSHOT"):
        server.create(alice, "trade", {"symbol": "ACME", "side": "buy", "quantity": 100})
        server.create(alice, "analysis", {"content": "jobspine " * 40, "chunk_size": 40})
        job = server.create(alice, "research", {"query": "structured concurrency", "depth": 400})
        open_job(driver, job["id"])
        wait(driver, lambda d: len(timeline(d)) >= 30, 30)
        js(driver, "document.getElementById('notice-close').click()")
        time.sleep(0.5)
        shutil.copy(shot(driver, "0-dashboard"), ROOT / "docs" / "dashboard.png")


#: The page's protocol client against a scripted socket (run in the page, asynchronously).
CLIENT_RULES = (ROOT / "tests" / "dashboard_client_rules.js").read_text()


def test_client_rules_of_the_protocol(server: Server, driver: WebDriver) -> None:
    """``conn.js`` against a scripted socket: PROTOCOL.md section 4's rules, message by message
    (live from the subscribe reply, duplicates ignored, a gap or a heartbeat head resubscribes
    from the cursor, skipped markers advance it, a reset is reported, 4004 signs out)."""
    driver.get(server.page)
    driver.set_script_timeout(10)
    got = driver.execute_async_script(CLIENT_RULES)
    assert "error" not in got, got
    job = ["job:J"]
    assert got["seen"] == [[n, job] for n in (1, 2, 3, 4, 5, 6, 9, 3)]
    assert got["skipped"] == [[7, 2, job]]
    assert got["resets"] == [["job:J", "epoch_changed: another database"]]
    assert got["signedOut"] == [4004] and got["sockets"] == 1
    hello, *subscribes = got["sent"]
    assert hello == {"op": "hello", "id": 0, "token": "TOKEN", "protocol": 1}
    cursors = [s["cursor"]["seq"] for s in subscribes]
    assert [s["op"] for s in subscribes] == ["subscribe"] * 3 and cursors == [0, 3, 9]
    assert got["saved"] == {"job:J": 3}


def test_brief_shows_no_value_as_nothing(server: Server, driver: WebDriver) -> None:
    """``brief`` (the job list's Step column, the focused job's "N% step" line) shows a job
    with no step (null) as an empty string, never a literal "null"; values keep their JSON."""
    driver.get(server.page)
    driver.set_script_timeout(10)
    got = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('/ui.js').then((ui) => done([ui.brief(null), ui.brief(undefined),"
        " ui.brief('fetching'), ui.brief(0), ui.brief({ a: null })]),"
        " (e) => done(String(e)));"
    )
    assert got == ["", "", "fetching", "0", '{"a":null}']
