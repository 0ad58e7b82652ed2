"""The chat page at / in headless Chromium: a streamed answer, the version, thumbs and a
correction that reaches the log."""

from __future__ import annotations

import shutil

import pytest

webdriver = pytest.importorskip("selenium.webdriver")


def chrome():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not driver_path or not browser:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium "
                    "chromium-driver)")  # fmt: skip
    opts = Options()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def test_chat_page_streams_shows_the_version_and_sends_feedback(live):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chrome()
    try:
        driver.get(live.url + "/")
        driver.find_element(By.ID, "token").send_keys(live.tokens["alice"])
        driver.find_element(By.ID, "input").send_keys("What does the river carry?")
        driver.find_element(By.ID, "send").click()
        wait = WebDriverWait(driver, 60)
        done = wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, ".assistant[data-done]"))
        )
        answer = done.find_element(By.CSS_SELECTOR, ".text").text
        assert done.find_element(By.CSS_SELECTOR, ".answered-by").text == "base"
        assert driver.find_element(By.ID, "version").text == "base"
        [row] = live.deps.log.rows()
        assert row["answer"].strip() == answer.strip() and row["user"] == "alice"
        done.find_element(By.CSS_SELECTOR, "button.up").click()
        wait.until(lambda d: done.find_element(By.CSS_SELECTOR, ".status").text == "thanks")
        assert live.deps.log.get(row["id"])["rating"] == "up"
        done.find_element(By.CSS_SELECTOR, "button.correct").click()
        done.find_element(By.CSS_SELECTOR, "input.correction").send_keys("Stones and silt.")
        done.find_element(By.CSS_SELECTOR, "button.save").click()
        wait.until(lambda d: live.deps.log.get(row["id"])["correction"] == "Stones and silt.")
    finally:
        driver.quit()
