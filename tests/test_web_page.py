"""The draw-a-digit page in a real browser: Debian's Chromium driven by Playwright, against
`mnist-cnn serve` on a model that really reads digits (one epoch on the real MNIST)."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import served
from mnist_cnn.data.splits import load_split
from mnist_cnn.inference.predict import CENTRE, centre_of_mass

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright's own browser download cannot work on these machines
# headless as root, and quiet: no calls home that a closed network would refuse
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_ENV = "MNIST_CNN_SCREENSHOT"  # set to a path to keep the screenshot (docs/draw-a-digit.png comes from here)
UPLOADS = 10
# strokes on the 280x280 canvas, in canvas pixels: a "1" and a "7" as a finger draws them
ONE = [[(140, 45), (136, 235)]]
SEVEN = [[(75, 60), (205, 60), (120, 235)]]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's Chromium is not installed (apt-get install -y chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def url(real_run, tmp_path_factory):
    with served(real_run / "last.pt", tmp_path_factory.mktemp("page-cwd")) as base:
        yield base


@pytest.fixture
def page(browser, url):
    """The page, loaded, with every request it makes recorded in page.requested."""
    context = browser.new_context(viewport={"width": 1100, "height": 540})
    page = context.new_page()
    page.requested = []
    page.on("request", lambda r: page.requested.append(r.url))
    page.goto(url + "/")
    page.wait_for_selector("[data-testid=probabilities] > li")
    yield page
    context.close()


def draw(page, strokes: list[list[tuple[int, int]]]) -> None:
    """Mouse strokes on the canvas (canvas pixels are CSS pixels: it is 280x280 on both counts)."""
    box = page.get_by_test_id("canvas").bounding_box()
    for stroke in strokes:
        page.mouse.move(box["x"] + stroke[0][0], box["y"] + stroke[0][1])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x, box["y"] + y, steps=12)
        page.mouse.up()


def settled(page) -> None:
    page.wait_for_selector("body[data-busy=false]")


def prediction(page) -> str:
    settled(page)
    return page.get_by_test_id("prediction").text_content()


def probabilities(page) -> list[float]:
    return page.eval_on_selector_all(
        "[data-testid=probabilities] > li", "items => items.map(li => [Number(li.dataset.digit), Number(li.dataset.p)])"
    )


def test_drawing_a_one_and_a_seven_predicts_them_live(page, url, tmp_path):
    draw(page, ONE)
    assert prediction(page) == "1"
    page.get_by_test_id("clear").click()
    draw(page, SEVEN)
    assert prediction(page) == "7"
    shown = probabilities(page)
    assert [d for d, _ in shown] == list(range(10))
    assert sum(p for _, p in shown) == pytest.approx(1, abs=1e-3)
    assert max(shown, key=lambda dp: dp[1])[0] == 7
    # the 28x28 input is drawn: white strokes on black, the centre of mass where MNIST puts it
    pixels = page.evaluate("""() => Array.from(document.querySelector('[data-testid=preprocessed]')
                              .getContext('2d').getImageData(0, 0, 28, 28).data.filter((_, i) => i % 4 == 0))""")
    seen = np.array(pixels).reshape(28, 28)
    assert seen.max() > 200 and seen[0].max() == seen[:, 0].max() == 0
    assert np.allclose(centre_of_mass(seen.astype(np.float32)), CENTRE, atol=1)
    assert "ms" in page.locator("#status").text_content()  # the server's latency
    shot = tmp_path / "draw-a-digit.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] >= 800
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])
    # offline: nothing but this server was asked for anything
    assert page.requested and all(r.startswith(url + "/") or r.startswith("data:") for r in page.requested)


def test_clear_empties_the_prediction(page):
    draw(page, SEVEN)
    assert prediction(page) == "7"
    page.get_by_test_id("clear").click()
    assert page.get_by_test_id("prediction").text_content() == ""
    assert all(p == 0 for _, p in probabilities(page))
    # and a drawing cleared while its answer is on the way stays cleared
    draw(page, ONE)
    page.get_by_test_id("clear").click()
    assert prediction(page) == ""


def test_uploaded_mnist_test_digits_are_read_as_their_labels(page, real_dir, tmp_path):
    images, labels = load_split(real_dir, "test")
    right = 0
    for i in range(UPLOADS):
        path = tmp_path / f"test-{i}-label-{int(labels[i])}.png"
        Image.fromarray(images[i].numpy()).save(path)
        page.get_by_test_id("upload").set_input_files(str(path))
        page.wait_for_selector(f"[data-testid=prediction][data-for='{path.name}']")
        right += prediction(page) == str(int(labels[i]))
        assert sum(p for _, p in probabilities(page)) == pytest.approx(1, abs=1e-3)
    assert right >= UPLOADS - 1


def test_a_dropped_picture_is_read_and_a_bad_one_shows_the_servers_message(page, real_dir):
    images, labels = load_split(real_dir, "test")
    buf = io.BytesIO()
    Image.fromarray(images[1].numpy()).save(buf, format="PNG")
    drop = """([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, {type: 'image/png'}));
        document.getElementById('dropzone').dispatchEvent(new DragEvent('drop', {dataTransfer: data}));
    }"""
    page.evaluate(drop, ["dropped.png", base64.b64encode(buf.getvalue()).decode()])
    page.wait_for_selector("[data-testid=prediction][data-for='dropped.png']")
    assert prediction(page) == str(int(labels[1]))
    page.evaluate(drop, ["notes.png", base64.b64encode(b"not an image").decode()])
    page.wait_for_selector("#status.error")
    assert page.get_by_test_id("prediction").text_content() == ""
    assert page.locator("#status").text_content() == "notes.png: not an image PIL can read (PNG, JPEG, BMP, GIF, ...)"


def test_the_page_is_usable_from_the_keyboard_and_labelled(page):
    assert page.get_by_role("button", name="Clear").count() == 1
    assert page.get_by_label("Upload a picture").get_attribute("data-testid") == "upload"
    assert "draw one digit" in page.get_by_test_id("canvas").get_attribute("aria-label")
    order = []
    for _ in range(3):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.dataset.testid"))
    assert order == ["canvas", "clear", "upload"]
    draw(page, SEVEN)
    assert prediction(page) == "7"
    page.get_by_test_id("canvas").press("Escape")
    assert prediction(page) == ""
