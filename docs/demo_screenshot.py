"""Screenshot of a running `agentmesh demo` for the README, taken in headless Chromium.

    agentmesh demo --port 7860 &
    python docs/demo_screenshot.py http://127.0.0.1:7860 docs/img/demo.png

Asks the demo's first example question (clicks it, then "Ask"), waits until all three columns
have finished, and saves the page. Needs Debian's chromium and chromium-driver and selenium.
"""
from __future__ import annotations

import shutil
import sys

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main(url: str, out: str, timeout_s: float = 600) -> None:
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1050"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or ""
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get(url)
        wait = WebDriverWait(driver, timeout_s)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".gallery-item, button.gallery-item, td"))
        driver.find_elements(By.CSS_SELECTOR, ".gallery-item, button.gallery-item, td")[0].click()
        driver.find_element(By.CSS_SELECTOR, "#ask").click()
        wait.until(lambda d: all("latency" in d.find_element(By.CSS_SELECTOR, f"#stats-{m}").text
                                 for m in ("alone", "t2t", "c2c")))
        driver.save_screenshot(out)
        print(f"wrote {out}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main(*sys.argv[1:3])
