"""The chat page in a real browser (Debian's chromium + chromium-driver through selenium, headless): load /,
send a message, watch the answer stream in (and equal the API's greedy answer), start a new chat. Slow; skips with the
reason when selenium, chromium or chromedriver is missing (install: apt-get install chromium chromium-driver;
pip install selenium)."""

from __future__ import annotations

import shutil
import time

import pytest
from serve_helpers import Server, make_ckpt

pytestmark = pytest.mark.slow


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("no browser: apt-get install chromium chromium-driver (needs chromium and chromedriver on PATH)")
    from selenium.webdriver.chrome.service import Service as ChromeService

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"):
        opts.add_argument(a)
    return webdriver.Chrome(service=ChromeService(executable_path=driver), options=opts)


def _wait(cond, timeout=60.0, what=""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_page_streams_an_answer(tmp_path):
    browser = _browser()
    server = Server(make_ckpt(tmp_path), "--max-batch", "2")
    try:
        from selenium.webdriver.common.by import By

        browser.get(server.url + "/")
        _wait(lambda: "context" in browser.find_element(By.ID, "model").text, what="the model name")
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("0")
        browser.find_element(By.ID, "input").send_keys("Hello there")
        browser.find_element(By.ID, "send").click()
        _wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.user"), what="the user message")
        assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Hello there"
        # the answer grows while it streams: record its lengths until it is done
        lengths = []

        def done():
            a = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
            lengths.append(len(a.text))
            return a.get_attribute("data-state") in ("done", "error", "stopped") and a

        answer = _wait(done, what="the streamed answer")
        assert answer.get_attribute("data-state") == "done", answer.text
        assert answer.text.strip()
        # the same greedy answer through the API (the page sent temperature 0 and the same message)
        import openai

        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        ref = c.chat.completions.create(model=c.models.list().data[0].id, temperature=0,
                                        messages=[{"role": "user", "content": "Hello there"}])
        assert answer.text == ref.choices[0].message.content.strip() or answer.text == ref.choices[0].message.content
        # new chat clears the conversation
        browser.find_element(By.ID, "new").click()
        _wait(lambda: not browser.find_elements(By.CSS_SELECTOR, ".msg"), what="an empty chat")
    finally:
        browser.quit()
        server.stop()
