"""The review page in a real headless Chromium, served by the trainer of a real run: it shows the
run's samples, and a rating made by clicking on the page is stored in Redis and exported."""

from __future__ import annotations

import pathlib
import time
import urllib.request

import pytest

from services.common.config import BelayConfig
from services.common.review_store import ReviewStore
from services.local_stack import LocalStack
from tests.system.conftest import variant

CHROMIUM = pathlib.Path("/usr/bin/chromium")
CHROMEDRIVER = pathlib.Path("/usr/bin/chromedriver")


def headless_chromium():
    """Debian's chromium through its chromedriver; never a driver selenium-manager would download."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: `make test` installs them (make system-deps: "
            "apt-get install --no-install-recommends chromium chromium-driver)"
        )
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def wait_for_samples(store: ReviewStore, stack: LocalStack, timeout: float = 300) -> list[dict]:
    """The samples the trainer records after its first step (a deadline, so a stuck run fails)."""
    deadline = time.monotonic() + timeout
    while not (samples := store.recent_samples()):
        stack.check_alive()
        assert time.monotonic() < deadline, f"no samples in Redis after {timeout:.0f} s"
        time.sleep(0.2)
    return samples


def settled_samples(store: ReviewStore, stack: LocalStack, timeout: float = 60) -> list[dict]:
    """The newest samples once the trainer has stopped adding any (the same for 2 s)."""
    deadline = time.monotonic() + timeout
    last = store.recent_samples()
    while True:
        time.sleep(2.0)
        stack.check_alive()
        now = store.recent_samples()
        if [s["rollout_id"] for s in now] == [s["rollout_id"] for s in last]:
            return now
        assert time.monotonic() < deadline, "the trainer kept adding samples after the policy stopped"
        last = now


def scrape(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode().splitlines()


def test_the_page_shows_a_real_runs_samples_and_a_click_stores_and_exports_a_rating(
    stack_config: BelayConfig, tmp_path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # max_steps 0: the trainer keeps serving the page until the stack is stopped below.
    config = variant(stack_config, {"trainer": {"max_steps": 0, "ppo_epochs": 1}})
    stack = LocalStack(config, tmp_path / "run", say=lambda *_: None)
    browser = None
    try:
        stack.start()
        stack.wait_healthy(180)
        store = ReviewStore.from_url(config.redis.url, config.run.name)
        wait_for_samples(store, stack)
        # Stop the policy so no new samples push these off the page (it shows the newest 50) while
        # Chromium starts; the trainer trains on what is queued, then waits, serving the page.
        policy = stack.processes.pop("policy").popen
        policy.terminate()
        policy.wait(60)
        samples = {s["rollout_id"]: s for s in settled_samples(store, stack)}
        assert "review page at http://127.0.0.1:" in stack.processes["trainer"].log_path.read_text()

        browser = headless_chromium()
        browser.get(f"http://127.0.0.1:{config.trainer.review_port}/")
        assert "Belay review" in browser.title
        shown = [row.get_attribute("data-rollout-id") for row in browser.find_elements(By.CSS_SELECTOR, "tr.sample")]
        assert set(samples) == set(shown)  # the newest 50 (or all of them)
        # HTML parsing turns \r into \n and drops NUL: compare exactly on a sample without them.
        rollout_id = next(i for i, s in samples.items() if not {"\r", "\0"} & set(s["response"]))
        row = browser.find_element(By.CSS_SELECTOR, f'tr.sample[data-rollout-id="{rollout_id}"]')
        response = row.find_element(By.CSS_SELECTOR, "td.response")
        assert response.is_displayed()
        assert response.get_attribute("textContent") == samples[rollout_id]["response"]

        row.find_element(By.CSS_SELECTOR, 'button.rate[data-rating="4"]').click()
        status = row.find_element(By.CSS_SELECTOR, ".status")
        WebDriverWait(browser, 30).until(lambda _: status.text != "saving..." and status.text != "")
        assert status.text == "rated 4"

        assert [(r["rollout_id"], r["rating"]) for r in store.ratings()] == [(rollout_id, 4)]
        metrics = scrape(config.trainer.metrics_port)
        assert 'belay_review_ratings_total{rating="4"} 1.0' in metrics
        assert 'belay_review_ratings_total{rating="5"} 0.0' in metrics
        assert "belay_review_rating_mean 4.0" in metrics
        stack.check_alive()
    finally:
        if browser is not None:
            browser.quit()
        stack.stop()
