"""The dashboard in a real headless Chromium, against the real system on this host.

The interface, the watcher and three clients run as processes on the session's RabbitMQ,
SecantusDB and nginx (tests/support/pipeline_harness.py); the browser signs in with the read
token, and everything it shows comes from them. Screenshots go to tmp_path, or to
$DLOPBOX_SCREENSHOTS (docs/ holds the ones the README shows).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.common.selenium_manager import SeleniumManager
from selenium.webdriver.remote.webdriver import WebDriver

from dlopbox.client.state import load_state
from tests.support import browser
from tests.support.browser import DESKTOP, PHONE, chromium, resize, text, visible
from tests.support.pipeline_harness import READ_TOKEN, TOKEN, Pipeline
from tests.support.polling import eventually

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(browser.available() is not None, reason=str(browser.available()))]

#: The issue's bar: a file written on the master is in the feed and in every slave's row within this.
LIVE_WITHIN = 1.0


@pytest.fixture(autouse=True)
def no_selenium_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Selenium Manager downloads drivers: it must never run (both paths are given)."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Selenium Manager was invoked")
    monkeypatch.setattr(SeleniumManager, "binary_paths", refuse)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("DLOPBOX_SCREENSHOTS") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


async def started(p: Pipeline) -> None:
    p.start()
    for i in range(len(p.clients)):
        await eventually(lambda i=i: load_state(p.slaves[i]) is not None, 60, f"client {i}'s first sync")


async def sign_in(driver: WebDriver, url: str, token: str) -> None:
    driver.get(url + "/")
    await eventually(lambda: visible(driver, "token"), 10, "the sign-in form")
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token, Keys.ENTER)


def rows(driver: WebDriver, body_id: str) -> list[dict[str, str]]:
    """Each row of a table body as its data attributes and cell texts (read in one script call)."""
    return driver.execute_script("""
        return [...document.getElementById(arguments[0]).rows].map((r) => ({
            seq: r.dataset.seq || "", client: r.dataset.client || "", state: r.dataset.state || "",
            cells: [...r.cells].map((c) => c.textContent)}));""", body_id)


def slave_rows(driver: WebDriver) -> dict[str, dict[str, str]]:
    return {r["client"]: r for r in rows(driver, "slave-rows") if r["client"]}


async def until_slaves(driver: WebDriver, check, timeout: float, what: str) -> None:
    """Wait until ``check(rows by client id)`` holds; a timeout reports the rows last shown."""
    try:
        await eventually(lambda: check(slave_rows(driver)), timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the slaves' rows: {slave_rows(driver)}") from None


def no_horizontal_scroll(driver: WebDriver) -> bool:
    return driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")


async def test_a_wrong_token_is_refused_and_the_write_token_never_signs_in(pipeline: Pipeline, shots: Path):
    p = pipeline
    p.interface.start()
    with chromium(PHONE) as driver:
        await sign_in(driver, p.interface.url, "not-the-token")
        await eventually(lambda: "wrong token" in text(driver, "signin-error"), 10, "the refusal")
        assert not visible(driver, "dashboard")
        assert no_horizontal_scroll(driver)
        driver.save_screenshot(str(shots / "dashboard-signin-phone.png"))
        await sign_in(driver, p.interface.url, TOKEN)
        await eventually(lambda: "write token" in text(driver, "signin-error"), 10, "the write token refused")
        assert not visible(driver, "dashboard")
        assert not driver.get_cookies()
        # Without a session, the push channel and the read routes refuse the browser.
        driver.get(p.interface.url + "/live")
        assert "sign in" in driver.page_source
        driver.get(p.interface.url + "/clients")
        assert "bearer token is required" in driver.page_source


async def test_the_dashboard_shows_the_master_every_slave_and_the_history(pipeline: Pipeline, shots: Path):
    p = pipeline
    await started(p)
    (p.master / "docs").mkdir()
    with chromium(DESKTOP) as driver:
        await sign_in(driver, p.interface.url, READ_TOKEN)
        await eventually(lambda: visible(driver, "dashboard"), 10, "the dashboard after sign-in")
        # The session is an HttpOnly cookie: the page's script cannot read it, the URL and source hold no token.
        cookie = driver.get_cookie("dlopbox_session")
        assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert READ_TOKEN not in cookie["value"]
        assert "dlopbox_session" not in driver.execute_script("return document.cookie")
        assert READ_TOKEN not in driver.current_url and READ_TOKEN not in driver.page_source

        # Every client is listed, in sync, with RabbitMQ's view of its queue.
        await until_slaves(driver, lambda r: set(r) == set(p.client_ids), 20, "every client listed")
        await until_slaves(driver, lambda r: all(row["state"] == "in sync" and row["cells"][5] == "0"
                                                 for row in r.values()), 20, "every client in sync")
        assert "ok" in text(driver, "mongodb") and "ok" in text(driver, "rabbitmq") and text(driver, "log") == "log ok"

        # A file written on the master: in the feed, then in every slave's row, within a second.
        started_at = time.monotonic()
        (p.master / "docs" / "report.txt").write_bytes(b"quarterly numbers\n" * 100)

        def in_feed() -> str | None:
            found = [r for r in rows(driver, "feed-rows") if r["cells"] and r["cells"][3] == "docs/report.txt"]
            return found[0]["seq"] if found else None

        seq = int(await eventually(in_feed, 10, "the write in the feed", interval=0.02))
        feed_after = time.monotonic() - started_at
        assert rows(driver, "feed-rows")[0]["cells"][2:5] == ["write", "docs/report.txt", "1.8 KiB"]

        def every_slave_took_it() -> bool:
            return all(int(r["seq"]) >= seq and r["state"] == "in sync" for r in slave_rows(driver).values())

        await eventually(every_slave_took_it, 10, "every slave's row at the write's seq", interval=0.02)
        slaves_after = time.monotonic() - started_at
        print(f"feed after {feed_after * 1000:.0f} ms, every slave's row after {slaves_after * 1000:.0f} ms")
        assert feed_after < LIVE_WITHIN and slaves_after < LIVE_WITHIN, (feed_after, slaves_after)
        assert (p.slaves[0] / "docs" / "report.txt").read_bytes() == b"quarterly numbers\n" * 100
        await eventually(lambda: text(driver, "m-rate") != "0", 5, "events per minute")
        # The watcher's own report (PUT /master): what it watches, and a name it cannot send.
        (p.master / "docs" / os.fsdecode(b"broken\xff.txt")).write_bytes(b"not UTF-8")
        await eventually(lambda: text(driver, "m-unsendable") == "1", 10, "the master's report in its panel")
        assert text(driver, "m-dirs") == "2 directories" and text(driver, "m-rescans") == "0"
        assert "docs/broken\\xff.txt: path is not valid UTF-8" in text(driver, "m-unsendable-list")
        assert "docs/report.txt" in text(driver, "m-last")
        driver.save_screenshot(str(shots / "dashboard.png"))

        # A stopped client turns offline, and back once it runs again.
        stopped = p.client_ids[1]
        await p.clients[1].stopped()
        await until_slaves(driver, lambda r: r[stopped]["state"] == "offline", 20, "the stopped client offline")
        assert {r["state"] for c, r in slave_rows(driver).items() if c != stopped} == {"in sync"}
        (p.master / "docs" / "while-away.txt").write_bytes(b"you missed me")
        await until_slaves(driver, lambda r: r[stopped]["cells"][5] == "1", 20, "the offline client's waiting message")
        p.clients[1].start()
        await until_slaves(driver, lambda r: r[stopped]["state"] == "in sync", 30, "the client back in sync")

        # The history of a folder lists its events in order, from the MongoDB log.
        os.rename(p.master / "docs" / "report.txt", p.master / "docs" / "final.txt")
        (p.master / "docs" / "while-away.txt").unlink()
        await eventually(lambda: any(r["cells"][2:4] == ["delete", "docs/while-away.txt"]
                                     for r in rows(driver, "feed-rows")), 10, "the delete in the feed")
        driver.find_element(By.ID, "history-prefix").send_keys("docs", Keys.ENTER)

        def history() -> list[tuple[str, str]]:
            return [(r["cells"][2], r["cells"][3]) for r in rows(driver, "history-rows")]

        expected = [("mkdir", "docs"), ("write", "docs/report.txt"), ("write", "docs/while-away.txt"),
                    ("move", "docs/report.txt → docs/final.txt"), ("delete", "docs/while-away.txt")]
        await eventually(lambda: history() == expected, 10, f"the history of docs/ (got {history()})")
        seqs = [int(r["seq"]) for r in rows(driver, "history-rows")]
        assert seqs == sorted(seqs) and seqs[1] == seq
        assert "end of the log" in text(driver, "history-note")

        # Usable at 1280x800 and on a phone: nothing wider than the window, the slaves' table readable.
        assert no_horizontal_scroll(driver)
        driver.save_screenshot(str(shots / "dashboard-history.png"))
        resize(driver, PHONE)
        await eventually(lambda: no_horizontal_scroll(driver), 5, "the page fitting a phone")
        assert visible(driver, "slave-rows") and visible(driver, "feed-rows")
        driver.save_screenshot(str(shots / "dashboard-phone.png"))

        # Signing out ends the session: the channel is refused from then on.
        driver.find_element(By.ID, "signout").click()
        await eventually(lambda: visible(driver, "signin-view"), 10, "the sign-in form after signing out")
        assert not driver.get_cookies()

    assert READ_TOKEN not in p.interface.log_path.read_text(errors="replace")
    for name in ("dashboard.png", "dashboard-phone.png"):
        assert (shots / name).stat().st_size > 10_000
