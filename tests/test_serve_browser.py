"""`causal-dit serve` in a real browser: Debian's headless Chromium, driven by Playwright's sync API (no
browser is ever downloaded), against a real uvicorn server on a free loopback port. The page plays,
follows a prompt switch, stops and starts again; two pages at once stay isolated; a screenshot of the
playing page is kept in test-artifacts/."""

import os
import pathlib

import numpy as np
import pytest
from serve_fixtures import FRAMES, embedded_pipeline, serving

from causal_dit_jax.app.serve import ServerConfig
from causal_dit_jax.bench.prompt_following import read_clip

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = pathlib.Path(__file__).parents[1] / "test-artifacts"
RED, BLUE = "a red square moving right", "a blue square moving right"
SWITCH_FRAMES = 45  # 4 chunks: switched (a cut) at chunk 1, the object is blue two chunks later
QUEUE = 2  # frames a session's generation may run ahead of its page

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"Debian's chromium is not installed at {CHROMIUM} (.ci/run installs it)"
)


@pytest.fixture(scope="module")
def server():
    with serving(ServerConfig(max_sessions=2, queue_frames=QUEUE)) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        yield b
        b.close()


@pytest.fixture
def context(browser, server):
    """A browser context per test: its pages (and so their sessions) are closed after it, pass or fail."""
    c = browser.new_context()
    yield c
    c.close()
    server.wait_sessions(0)


def open_page(context, server):
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url)
    page.wait_for_function("() => document.getElementById('state').textContent === 'ready'")
    page.errors = errors
    return page


def fill(page, prompt: str, frames: int, seed: int = 0, switch: str | None = None, fps: int = 16) -> None:
    page.fill("#prompt", prompt)
    page.fill("#frames", str(frames))
    page.fill("#seed", str(seed))
    page.fill("#fps", str(fps))
    if switch is not None:
        page.select_option("#switch-mode", switch)


def received(page) -> int:
    return int(page.text_content("#received"))


def wait_received(page, n: int, timeout: float = 120) -> None:
    page.wait_for_function("n => Number(document.getElementById('received').textContent) >= n", arg=n, timeout=timeout * 1000)


def wait_state(page, starts: str, timeout: float = 120) -> str:
    page.wait_for_function(
        "s => document.getElementById('state').textContent.startsWith(s)", arg=starts, timeout=timeout * 1000
    )
    return page.text_content("#state")


def canvas(page) -> np.ndarray:
    """The canvas's pixels, uint8 [H, W, 3]: what the page shows."""
    data = page.evaluate(
        """() => {
            const c = document.getElementById('screen');
            return {w: c.width, h: c.height, px: Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)};
        }"""
    )
    return np.asarray(data["px"], np.uint8).reshape(data["h"], data["w"], 4)[..., :3]


def colour(frame: np.ndarray) -> str | None:
    return read_clip(frame[None])["colour"]


def test_the_page_plays_follows_a_switch_stops_and_starts_again(context, server):
    page = open_page(context, server)
    assert page.locator("#decoder option").all_text_contents() == ["wan"]  # what the embedded default offers
    fill(page, RED, SWITCH_FRAMES, switch="cut", fps=10)
    page.click("#start")
    wait_received(page, 2)
    # Paused on the screen's second frame, the stream is held before chunk 1 (frame 10): it runs at most
    # QUEUE frames and one decode (4 frames) ahead of the page, and 5 more frames take half a second.
    page.click("#pause")
    wait_state(page, "paused")
    assert page.text_content("#pause") == "Resume"
    first = canvas(page)
    assert first.shape == (128, 192, 3) and colour(first) == "red"
    page.fill("#prompt", BLUE)
    page.click("#switch")  # mid-stream
    page.click("#pause")  # resume
    wait_state(page, f"playing: {BLUE}")  # the stream took it at its next chunk boundary
    wait_received(page, 36)  # into chunk 3 (frames 33-44), less the few stale frames dropped at the switch
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_playing.png"), full_page=True)
    wait_state(page, "done")
    last = canvas(page)
    assert np.abs(first.astype(int) - last).mean() > 2, "the frames change"
    assert colour(last) == "blue", "the frames follow the new prompt"
    assert received(page) + int(page.text_content("#dropped")) == SWITCH_FRAMES
    assert page.text_content("#latency").endswith(" s") and page.text_content("#gen-fps").endswith("frames/s")
    link = page.locator("#download")
    assert (
        link.is_visible() and page.request.get(server.url + link.get_attribute("href")).headers["content-type"] == "video/mp4"
    )

    fill(page, RED, FRAMES)  # start again, stop it mid-stream, start once more
    page.click("#start")
    wait_received(page, 1)
    page.click("#stop")
    assert "stopped" in wait_state(page, "stopped")
    assert received(page) < FRAMES and page.is_enabled("#start") and not page.is_enabled("#stop")
    page.click("#start")
    wait_state(page, "done")
    assert received(page) == FRAMES
    want = embedded_pipeline().generate(RED, FRAMES, seed=0)[0][-1].astype(np.float32)
    assert np.abs(canvas(page).astype(np.float32) - want).mean() < 8  # the stream's last frame, through JPEG
    assert not page.errors and page.is_hidden("#error")


def test_two_pages_at_once_stay_isolated(context, server):
    """Two sessions at once: each page ends on its own prompt's last frame (the pipeline's, through
    JPEG: mean |difference| under 2 x 4 of 255), not the other's; the blue one reads blue."""
    sessions = [(RED, 1), ("a blue circle moving left", 2)]
    pages = [open_page(context, server), open_page(context, server)]
    for page, (prompt, seed) in zip(pages, sessions):
        fill(page, prompt, FRAMES, seed)
    for page in pages:
        page.click("#start")
    for page in pages:
        wait_state(page, "done")
    assert [received(p) for p in pages] == [FRAMES, FRAMES]
    shown = [canvas(p).astype(np.float32) for p in pages]
    want = [embedded_pipeline().generate(prompt, FRAMES, seed=seed)[0][-1].astype(np.float32) for prompt, seed in sessions]
    diff = [[float(np.abs(a - b).mean()) for b in want] for a in shown]
    assert diff[0][0] < 8 < diff[0][1] and diff[1][1] < 8 < diff[1][0], diff
    assert colour(shown[1].astype(np.uint8)) == "blue" and colour(shown[0].astype(np.uint8)) != "blue"


def test_a_third_page_is_told_the_server_is_busy(context, server):
    pages = [open_page(context, server), open_page(context, server)]
    third = context.new_page()
    third.goto(server.url)
    third.wait_for_function("() => document.getElementById('state').textContent === 'busy'")
    assert "busy" in third.text_content("#error") and third.is_visible("#error")
    pages[0].close()
    server.wait_sessions(1)
    fill(third, RED, 9)
    third.click("#start")  # a place is free again: Start reconnects
    wait_state(third, "done")
    assert received(third) == 9


def test_bad_input_shows_a_clear_error_on_the_page(context, server):
    page = open_page(context, server)
    page.fill("#prompt", "   ")
    page.click("#start")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error") == "the prompt is empty: describe the video"
    fill(page, RED, 34)
    page.click("#start")
    page.wait_for_function("() => document.getElementById('error').textContent.includes('34 frames')")
    assert "1 + 4k frames" in page.text_content("#error") and received(page) == 0
