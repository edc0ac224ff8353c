"""`internvl-lora ui` as a real subprocess on the demo's base and adapter, driven in a real headless Chromium.

The chat-tab screenshot goes to $INTERNVL_UI_SCREENSHOT when set (the README's docs/ui.png comes from there),
else into the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from internvl.synthetic import COLOURS, FRENCH

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402 - after the skip when selenium is absent
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver packages")
QUESTION = "Quelle est la couleur de la forme?"


@pytest.fixture(scope="module")
def page(demo_run, tmp_path_factory):
    """The page's address, served by `ui` on the demo's base and adapter on a free port (named as a user in the
    demo's folder names them)."""
    log = tmp_path_factory.mktemp("ui") / "stderr.txt"
    name = demo_run.out.name
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "internvl.cli", "ui", f"{name}/base", "--adapter", f"{name}/adapter", "--port", "0"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=demo_run.out.parent)
    line = process.stdout.readline()  # the address, once it listens; "" if it died
    assert line.startswith("internvl-lora ui: http://127.0.0.1:"), log.read_text()[-3000:]
    yield line.split()[2]
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,640"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def chat_answers(demo_run, question: str, image=None, video=None) -> list[str]:
    """What `chat` answers with the base and with the adapter, as the page asks (greedy, 8 new tokens): about an
    image tiled as the model serves, or a video's middle frames (4) named before the question, as `chat --video`."""
    from internvl.data.video import load_video, video_prefix
    from internvl.inference import load_for_inference
    from internvl.train.outputs import ServingSettings

    answers = []
    for adapter in (None, demo_run.out / "adapter"):
        loaded = load_for_inference(demo_run.out / "base", adapter)
        asked, counts = question, None
        if image is not None:
            with Image.open(image) as picture:
                tiles = ServingSettings.from_model(loaded.model).image_tiles(picture.convert("RGB"))
        else:
            tiles, counts = load_video(video, 4, input_size=loaded.model.config.image_size)
            asked = video_prefix(len(counts)) + question
        answers.append(loaded.model.chat(loaded.tokenizer, tiles, asked, dict(max_new_tokens=8, do_sample=False),
                                         num_patches_list=counts))
    return answers


def ask_every_model(browser, file, question: str, **settings: str) -> list[str]:
    """Upload `file`, ask `question` with the page's settings changed as given (field id: value), and wait for
    every column's answer."""
    wait = WebDriverWait(browser, 120)
    wait.until(lambda driver: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    browser.find_element(By.ID, "image").send_keys(str(file))
    preview = "preview-video" if file.suffix == ".mp4" else "preview"
    wait.until(lambda driver: (driver.find_element(By.ID, preview).get_attribute("src") or "").startswith("data:"))
    browser.find_element(By.ID, "question").send_keys(question)
    for field, value in settings.items():
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "ask").click()
    boxes = browser.find_elements(By.CSS_SELECTOR, ".answer")
    wait.until(lambda driver: all(box.get_attribute("data-state") == "done" for box in boxes))
    return [box.text for box in boxes]


def test_the_page_shows_the_base_s_and_the_adapter_s_answers_side_by_side(page, browser, demo_run, tmp_path):
    held_out = demo_run.out / "data" / "held_out"
    image = held_out / json.loads((held_out / "data.jsonl").read_text().splitlines()[0])["image"]
    browser.get(page)
    WebDriverWait(browser, 120).until(
        lambda driver: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    headers = [element.text for element in browser.find_elements(By.CSS_SELECTOR, ".column h2")]
    who = [element.text for element in browser.find_elements(By.CSS_SELECTOR, ".column .who")]
    assert headers == ["base model", "adapter"]
    name = demo_run.out.name
    assert who == [f"{name}/base", f"{name}/adapter on {name}/base"]

    answers = ask_every_model(browser, image, QUESTION, max_new_tokens="8")
    assert answers == chat_answers(demo_run, QUESTION, image=image)
    assert answers[0] in COLOURS and answers[1] in FRENCH.values()  # the base answers in English, the adapter in French

    screenshot = os.environ.get("INTERNVL_UI_SCREENSHOT") or str(tmp_path / "ui.png")
    assert browser.save_screenshot(screenshot)
    viewport = browser.execute_script("return [window.innerWidth, window.innerHeight]")
    assert list(Image.open(screenshot).size) == viewport


def test_a_video_is_asked_about_as_chat_video_asks(page, browser, demo_run, tmp_path):
    from tests.data.builders import write_video

    video = write_video(tmp_path / "clip.mp4", frames=12, size=(56, 56))
    browser.get(page)
    answers = ask_every_model(browser, video, "What happens?", max_new_tokens="8", num_segments="4")
    assert answers == chat_answers(demo_run, "What happens?", video=video)


def test_the_training_tab_shows_the_adapter_s_run(page, browser, demo_run):
    browser.get(page)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda driver: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    browser.find_element(By.ID, "tab-training").click()
    run = browser.find_element(By.CSS_SELECTOR, ".run")
    assert run.find_element(By.TAG_NAME, "h2").text == f"{demo_run.out.name}/adapter"
    curve = run.find_element(By.TAG_NAME, "img")
    wait.until(lambda driver: driver.execute_script("return arguments[0].naturalWidth", curve) > 0)

    def setting(label: str) -> str:
        return run.find_element(By.XPATH, f".//td[text()='{label}']/following-sibling::td").text

    assert setting("language_model LoRA").startswith("r=8, alpha 16, dropout 0.05 on mlp.down_proj")
    assert setting("steps trained") == "300"
    assert setting("checkpoints") == "none kept"  # the demo saves none
