"""`agentmesh demo`: the Gradio app on tiny models, driven by gradio_client and by headless Chromium."""
from __future__ import annotations

import os
import shutil
import time

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from agentmesh.c2c import Fuser  # noqa: E402
from agentmesh.runtime.scheduler import run_graph  # noqa: E402
from agentmesh.units import human_bytes  # noqa: E402
from agentmesh.serve.demo import (DEFAULT_CONFIG, DemoConfig, build_demo, launch, load_demo_config,  # noqa: E402
                                  method_graph)

NOTES = "The capital of Quendara is Hollowmere. The national animal of Quendara is the lynx."
QUESTION = "What is the capital of Quendara?"


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory):
    from agentmesh.c2c.checkpoints import save_fuser
    from agentmesh.models.pool import ModelPool

    receiver = tiny_model_factory("qwen3", "tiny", seed=21, num_layers=2, num_kv_heads=2, head_dim=16)
    sharer = tiny_model_factory("llama", "tiny", seed=22, num_layers=2, num_kv_heads=1, head_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        fuser = Fuser.build(receiver.signature, sharer.signature, hidden_dim=16, intermediate_dim=16)
    for p in fuser.projectors:
        p.key_gate_logit.data.fill_(2.0)
        p.value_gate_logit.data.fill_(2.0)
    folder = save_fuser(fuser, tmp_path_factory.mktemp("demo") / "fuser")
    pool = ModelPool()
    pool.put(receiver.name, receiver)
    pool.put(sharer.name, sharer)
    cfg = DemoConfig(receiver=receiver.name, sharer=sharer.name, fuser=str(folder), notes=NOTES,
                     max_new_tokens=8, sharer_max_new_tokens=8, examples=[{"question": QUESTION}])
    return cfg, pool


@pytest.fixture(scope="module")
def url(setup):
    cfg, pool = setup
    demo = build_demo(cfg, pool=pool)
    _, local_url, _ = launch(demo, block=False)
    assert local_url.startswith("http://127.0.0.1:")
    yield local_url
    demo.close()


def expected(cfg, pool, method):
    """What `method`'s graph answers when run directly (greedy: the demo must show the same)."""
    return run_graph(method_graph(cfg, method, NOTES), {"input": QUESTION}, pool=pool)


def test_the_shipped_default_config_names_the_embedded_pair_and_a_fuser_that_exists():
    cfg = load_demo_config(DEFAULT_CONFIG)
    assert cfg.receiver == cfg.sharer == "smollm2-135m-instruct"
    assert os.path.isfile(os.path.join(cfg.fuser, "fuser.json")) and cfg.examples
    assert load_demo_config(DEFAULT_CONFIG, receiver="other", fuser=None).receiver == "other"


def test_gradio_client_gets_three_streamed_answers(setup, url):
    cfg, pool = setup
    client = gradio_client.Client(url, verbose=False)
    job = client.submit(QUESTION, NOTES, True, api_name="/ask")
    alone, alone_stats, message, t2t, t2t_stats, c2c, c2c_stats = job.result(timeout=180)
    assert len(job.outputs()) > 3  # partial results arrived before the end: it streams
    want = {m: expected(cfg, pool, m) for m in ("alone", "t2t", "c2c")}
    assert alone == want["alone"]["receiver"].text
    assert (message, t2t) == (want["t2t"]["sharer"].text, want["t2t"]["receiver"].text)
    assert c2c == want["c2c"]["receiver"].text
    for stats in (alone_stats, t2t_stats, c2c_stats):
        assert "latency" in stats and "first token" in stats
    assert f"exchanged **{human_bytes(0)}**" in alone_stats
    assert f"exchanged **{human_bytes(len(message.encode()))}**" in t2t_stats  # the message's UTF-8 bytes
    assert f"exchanged **{human_bytes(0)}**" not in c2c_stats  # the sharer's KV cache crossed


@pytest.mark.skipif(shutil.which("chromedriver") is None, reason="needs chromium-driver (apt install chromium-driver)")
def test_headless_chromium_shows_all_three_answers(setup, url, tmp_path):
    selenium = pytest.importorskip("selenium")  # noqa: F841
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    cfg, pool = setup
    want = {m: expected(cfg, pool, m)["receiver"].text for m in ("alone", "t2t", "c2c")}
    driver = headless_chromium(webdriver)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 120)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#question textarea"))
        box.send_keys(QUESTION)
        driver.find_element(By.CSS_SELECTOR, "#ask").click()

        def finished(d):
            stats = [d.find_element(By.CSS_SELECTOR, f"#stats-{m}").text for m in want]
            return stats if all("latency" in s for s in stats) else False

        stats = wait.until(finished)
        answers = {m: driver.find_element(By.CSS_SELECTOR, f"#answer-{m} textarea").get_attribute("value")
                   for m in want}
        driver.save_screenshot(str(tmp_path / "demo.png"))
    finally:
        driver.quit()
    assert answers == want and all("exchanged" in s for s in stats)
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def headless_chromium(webdriver):
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--no-proxy-server"):
        options.add_argument(arg)
    if shutil.which("chromium"):
        options.binary_location = shutil.which("chromium")
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def test_adapters_in_the_demo_config_reach_every_method(tmp_path):
    (tmp_path / "specialist").mkdir()
    config = tmp_path / "demo.yaml"
    config.write_text("receiver: smollm2-135m-instruct\nsharer: smollm2-135m-instruct\n"
                      "fuser: ../fusers/smollm2_context\nsharer_adapter: specialist\n", encoding="utf-8")
    cfg = load_demo_config(config)
    assert cfg.sharer_adapter == str((tmp_path / "specialist").resolve()) and cfg.receiver_adapter is None
    for method in ("t2t", "c2c"):
        g = method_graph(cfg, method, NOTES)
        assert g.model_of("sharer").adapter == cfg.sharer_adapter
        assert g.model_of("receiver").adapter is None
