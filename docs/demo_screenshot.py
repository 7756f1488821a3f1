"""Screenshot of a running `agentmesh demo` for the README, taken in headless Chromium.

    agentmesh demo --port 7860 &
    python docs/demo_screenshot.py http://127.0.0.1:7860 docs/img/demo.png ["QUESTION"]

Types the question (default: the first example of configs/demo.yaml) next to the notes the demo
starts with, presses "Ask", waits until all three columns have finished, and saves the page.
Needs Debian's chromium and chromium-driver, and selenium.
"""
from __future__ import annotations

import shutil
import sys

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main(url: str, out: str, question: str | None = None, timeout_s: float = 900) -> None:
    if question is None:
        from agentmesh.serve.demo import load_demo_config

        question = load_demo_config().examples[0].question
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1250"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or ""
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get(url)
        wait = WebDriverWait(driver, timeout_s)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#question textarea")).send_keys(question)
        driver.find_element(By.CSS_SELECTOR, "#ask").click()
        wait.until(lambda d: all("latency" in d.find_element(By.CSS_SELECTOR, f"#stats-{m}").text
                                 for m in ("alone", "t2t", "c2c")))
        driver.save_screenshot(out)
        print(f"wrote {out}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main(*sys.argv[1:4])
