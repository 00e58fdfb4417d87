"""The workbench in a real browser (Debian's chromium through chromium-driver, driven by selenium) against a
real `lorakit serve`: a chat, three adapter choices answering one prompt side by side in one batch, an
adapter loaded and unloaded, and a training run's curves growing live. Screenshots are kept in
$LORAKIT_ARTIFACTS (default tests/artifacts/). Without chromium these tests fail: run scripts/setup_browser."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.serve.test_workbench import BASE, KEY, adapter_root, call, runs_root, start_server, stop_server, tiny_model_dir  # noqa: F401

ARTIFACTS = Path(os.environ.get("LORAKIT_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))
QUESTION = "Name three colors."


def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("chromium and chromium-driver are not installed: run scripts/setup_browser (as root, or with sudo)")
    return chromium, driver


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_root, runs_root):  # noqa: F811 (the fixtures imported above)
    # batch-invariant: each column's greedy answer must equal the same request answered alone
    url, proc = start_server(tiny_model_dir, "--api-key", KEY, "--adapter", f"one={adapter_root / 'one'}", "--adapter-root",
                             str(adapter_root), "--runs-root", str(runs_root), "--deterministic")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    chromium, driver = browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[dev]' (scripts/setup does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,1000", "--disable-gpu"):
        options.add_argument(flag)
    # the driver named explicitly: selenium would otherwise try to download one
    driver = webdriver.Chrome(service=Service(driver), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, server):  # the browser first: without chromium, fail before starting a server
    browser.get(server + "/")
    wait_for(lambda: "401" in text(browser, "connection"), "the page to try /v1/models without a key")  # no key typed yet
    browser.find_element("id", "api-key").send_keys(KEY)
    browser.find_element("id", "connect").click()
    wait_for(lambda: text(browser, "connection").startswith("connected"), "the page to connect with the key")
    return browser


def wait_for(condition, what: str, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def text(browser, element_id: str) -> str:
    return browser.find_element("id", element_id).text


def tab(browser, name: str) -> None:
    browser.find_element("css selector", f'nav .tab[data-tab="{name}"]').click()


def fill(browser, element_id: str, value: str) -> None:
    field = browser.find_element("id", element_id)
    field.clear()
    field.send_keys(value)


def choose(select_element, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(select_element).select_by_value(value)


def api_answer(server: str, body: dict, max_tokens: int) -> str:
    """The same question asked of the API directly, not streamed: the oracle for what the page shows."""
    ask = {**body, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens, "temperature": 0}
    response = call(server, "POST", "/v1/chat/completions", ask, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def screenshot(browser, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    assert browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    return path


def test_a_chat_streams_the_adapters_answer(page, server) -> None:
    choose(page.find_element("css selector", "#chat-picker select.model"), "one")
    fill(page, "chat-max-tokens", "12")
    fill(page, "chat-temperature", "0")
    fill(page, "chat-input", QUESTION)
    page.find_element("id", "chat-send").click()
    wait_for(lambda: "tokens in" in text(page, "chat-status"), "the chat answer")
    messages = page.find_elements("css selector", "#chat-log .message")
    assert [m.get_attribute("class") for m in messages] == ["message user", "message assistant"]
    answer = messages[1].find_element("css selector", ".text").get_attribute("textContent")
    assert answer and answer == api_answer(server, {"model": "one"}, 12)
    assert text(page, "chat-status").startswith("12 tokens")
    screenshot(page, "workbench-chat.png")


def test_stop_ends_a_chat_and_frees_its_slot(page, server) -> None:
    fill(page, "chat-max-tokens", "400")
    fill(page, "chat-input", "Write a long story.")
    page.find_element("id", "chat-send").click()
    answers = lambda: page.find_elements("css selector", "#chat-log .message.assistant .text")  # noqa: E731
    wait_for(lambda: len(answers()) == 2 and answers()[-1].get_attribute("textContent"), "the answer to start")
    page.find_element("id", "chat-stop").click()
    wait_for(lambda: text(page, "chat-status") == "stopped", "the page to stop")
    assert page.find_element("id", "chat-send").is_enabled() and not page.find_element("id", "chat-stop").is_enabled()
    wait_for(lambda: running_requests(server) == 0, "the server to free the stopped request's slot", timeout=20)
    page.find_element("id", "chat-clear").click()
    assert not page.find_elements("css selector", "#chat-log .message")


def running_requests(server: str) -> float:
    lines = call(server, "GET", "/metrics").text.splitlines()
    return next(float(line.split()[-1]) for line in lines if line.startswith("lorakit_requests_running"))


def test_one_prompt_answered_side_by_side_in_one_batch(page, server) -> None:
    tab(page, "compare")
    columns = page.find_elements("css selector", "#compare-columns .column")
    assert [c.find_element("css selector", "select.model").get_attribute("value") for c in columns] == ["__base__", "one"]
    page.find_element("id", "compare-add").click()
    third = page.find_elements("css selector", "#compare-columns .column")[2]
    choose(third.find_element("css selector", "select.model"), "__mix__")
    weight = third.find_element("css selector", ".mix-weight")
    weight.clear()
    weight.send_keys("0.5")
    fill(page, "compare-max-tokens", "160")
    fill(page, "compare-prompt", QUESTION)

    running, stop = [], threading.Event()

    def watch() -> None:  # the server's running batch while the columns stream
        while not stop.is_set():
            running.append(running_requests(server))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        page.find_element("id", "compare-run").click()
        wait_for(lambda: text(page, "compare-status") == "done", "every column to finish", timeout=120)
    finally:
        stop.set()
        watcher.join()
    columns = page.find_elements("css selector", "#compare-columns .column")
    assert [c.get_attribute("data-state") for c in columns] == ["done"] * 3, [c.text for c in columns]
    shown = [c.find_element("css selector", ".output").get_attribute("textContent") for c in columns]
    expected = [api_answer(server, body, 160) for body in ({"model": BASE}, {"model": "one"}, {"model": BASE, "adapters": {"one": 0.5}})]
    assert shown == expected
    assert len(set(shown)) == 3  # the base, the adapter and the half-strength adapter answer differently
    assert max(running) == 3  # the three requests were decoded together
    screenshot(page, "workbench-side-by-side.png")


def test_an_adapter_is_loaded_and_unloaded_from_the_page(page, server) -> None:
    tab(page, "adapters")
    def rows() -> list[str]:  # read in one script: the table is rebuilt after each load / unload
        return page.execute_script("return [...document.querySelectorAll('#adapter-table tbody tr[data-name]')].map(r => r.dataset.name)")

    assert rows() == ["one"]
    fill(page, "load-name", "two")
    fill(page, "load-path", "two")
    page.find_element("id", "load-button").click()
    wait_for(lambda: rows() == ["one", "two"], "adapter two in the table")
    assert "Success" in text(page, "adapters-status")
    assert "two" in {m["id"] for m in call(server, "GET", "/v1/models").json()["data"]}
    options = [o.get_attribute("value") for o in page.find_elements("css selector", "#chat-picker select.model option")]
    assert options == ["__base__", "one", "two", "__mix__"]  # every picker offers the new adapter
    screenshot(page, "workbench-adapters.png")

    fill(page, "load-name", "escape")
    fill(page, "load-path", "link")  # a symlink out of the adapter root
    page.find_element("id", "load-button").click()
    wait_for(lambda: text(page, "adapters-status").startswith("403"), "the refusal of a path out of the root")
    assert "error" in page.find_element("id", "adapters-status").get_attribute("class") and rows() == ["one", "two"]

    page.find_element("css selector", '#adapter-table button.unload[data-name="two"]').click()
    wait_for(lambda: rows() == ["one"], "adapter two gone from the table")
    assert "two" not in {m["id"] for m in call(server, "GET", "/v1/models").json()["data"]}


def test_a_training_runs_curves_grow_while_it_trains(page, server, runs_root) -> None:  # noqa: F811
    from lorakit.train import loop
    from tests.train.test_loop import QUIET, _cfg, _rows
    from tests.train.test_tensorboard import tiny_lora

    output_dir = runs_root / "live-run"
    rows, started = _rows(8), threading.Event()

    def slow_steps(state: loop.TrainState) -> None:
        started.set()
        time.sleep(0.7)  # time for the page to poll between steps

    cfg = _cfg(output_dir, max_steps=8, save_steps=0, logging_steps=1)
    training = threading.Thread(target=loop.train, args=(tiny_lora(), rows, rows[:4], cfg), kwargs=dict(on_step=slow_steps, **QUIET))
    training.start()
    try:
        started.wait(60)
        tab(page, "runs")
        fill(page, "run-path", "live-run")
        page.find_element("id", "run-open").click()
        points = lambda: int(page.find_element("id", "run-summary").get_attribute("data-train-points") or 0)  # noqa: E731
        wait_for(lambda: points() >= 1, "the first points")
        first = points()
        wait_for(lambda: points() > first, "the curve to grow while training", timeout=30)
        assert training.is_alive()  # seen growing before the run ended
    finally:
        training.join()
    evals = lambda: page.find_element("id", "run-summary").get_attribute("data-eval-points")  # noqa: E731
    wait_for(lambda: points() == 8 and evals() == "1", "the finished run's 8 losses and its eval loss")
    assert "eval loss" in text(page, "run-summary")
    options = [o.get_attribute("value") for o in page.find_elements("css selector", "#run-select option")]
    assert "run-a" in options  # the list of runs under the root
    screenshot(page, "workbench-runs.png")

    fill(page, "run-path", "../")
    page.find_element("id", "run-open").click()
    wait_for(lambda: text(page, "runs-status").startswith("403"), "the refusal of a path out of the runs root")
