"""The playground page (`/ui`) in a real headless Chromium (Debian's), against a real served sheaf.

Each panel is driven as a user would: fill its form, press Stream (or Stop, or Run as job) and
read the DOM. The page keeps the order of its live updates in `window.sheafUi.updates`, which is
how these tests see that progress, segments and tokens came before the result. A screenshot of
each panel after its run goes to `.artefacts/ui/`.
"""

import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, Response, sync_playwright

from tests.conftest import DEPLOYMENTS, ROOT, Server, speak

ARTEFACTS = ROOT / ".artefacts" / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's; nothing is downloaded
RUN_S = 60  # the longest any one run on the tiny models may take here


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        # A fake microphone (a beep) that the page may use without asking: the recording test.
        fake_microphone = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=fake_microphone)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser, together_server: Server) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    context.set_default_timeout(RUN_S * 1000)
    opened = context.new_page()
    open_playground(opened, together_server)
    try:
        yield opened
    finally:
        context.close()


def open_playground(page: Page, server: Server) -> None:
    page.goto(f"{server.url}/ui")
    page.wait_for_function("window.sheafUi && window.sheafUi.ready === true", timeout=20_000)


def panel(page: Page, name: str) -> Locator:
    return page.locator(f"#panel-{name}")


def field(page: Page, name: str, field_name: str) -> Locator:
    return panel(page, name).locator(f'.field[data-field="{field_name}"]').locator("input, select, textarea").first


def limits(page: Page, name: str, field_name: str) -> str:
    """The limits written by a field, from its schema."""
    return panel(page, name).locator(f'.field[data-field="{field_name}"] > .limits').inner_text()


def wait_for_state(page: Page, name: str, *states: str, timeout_s: float = RUN_S) -> str:
    page.wait_for_function(
        "([name, states]) => states.includes(document.getElementById(`panel-${name}`).dataset.state)",
        arg=[name, list(states)],
        timeout=timeout_s * 1000,
    )
    return str(panel(page, name).get_attribute("data-state"))


def updates(page: Page, name: str) -> list[str]:
    """The kinds of the live updates of `name`'s panel, in the order they were drawn."""
    kinds: list[str] = page.evaluate(
        "(name) => window.sheafUi.updates.filter((u) => u.deployment === name).map((u) => u.kind)", name
    )
    return kinds


def assert_live_before_result(kinds: list[str], live: str, count: int | None = None) -> None:
    assert "result" in kinds, kinds
    assert live in kinds and kinds.index(live) < kinds.index("result"), kinds
    if count is not None:
        assert kinds.count(live) == count, kinds


def shoot(page: Page, name: str, file: str | None = None) -> Path:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTEFACTS / f"{file or name}.png"
    panel(page, name).screenshot(path=str(path))
    return path


def image_size(image: Locator) -> tuple[int, int]:
    image.page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    size: list[int] = image.evaluate("(img) => [img.naturalWidth, img.naturalHeight]")
    return size[0], size[1]


def points(line: Locator) -> int:
    return len((line.get_attribute("points", timeout=1000) or "").split())


def test_the_page_its_files_and_the_deployments_it_builds_from_are_served(together_server: Server) -> None:
    with httpx.Client(base_url=together_server.url, timeout=10, follow_redirects=True) as client:
        page = client.get("/ui")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        # Offline: nothing the page loads comes from another host.
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text), page.text
        assert client.get("/ui/static/app.js").status_code == 200
        assert client.get("/ui/static/app.css").status_code == 200
        described = {item["name"]: item for item in client.get("/ui/deployments").json()["deployments"]}
    assert set(described) == set(DEPLOYMENTS)
    assert described["flux"]["adapters"] == ["a", "b"]
    assert described["flux"]["schema"]["properties"]["width"]["multipleOf"] == 8
    assert described["textgen"]["limits"]["max_streams"] == 8
    assert described["textgen"]["limits"]["max_new_tokens_limit"] == 30000
    assert described["forecast"]["model_type"] == "time_series"


def test_flux_streams_its_steps_and_previews_then_the_image_of_the_asked_size(page: Page) -> None:
    field(page, "flux", "prompt").fill("a red fox in snow")
    field(page, "flux", "height").fill("32")
    field(page, "flux", "width").fill("64")
    field(page, "flux", "num_inference_steps").fill("4")
    field(page, "flux", "preview_every").fill("1")
    field(page, "flux", "seed").fill("7")
    flux = panel(page, "flux")
    flux.locator(".adapters-default").uncheck()
    flux.locator('.adapter[value="a"]').check()
    flux.locator("button.stream").click()
    assert wait_for_state(page, "flux", "done", "error") == "done", flux.locator(".panel-error").inner_text()
    assert_live_before_result(updates(page, "flux"), "progress", count=4)
    assert flux.locator(".preview").get_attribute("src", timeout=1000)
    assert image_size(flux.locator(".result-image")) == (64, 32)
    assert "seed 7" in flux.locator(".seed").inner_text()
    assert flux.locator("progress").evaluate("(bar) => [bar.value, bar.max]") == [4, 4]
    shutil.copyfile(shoot(page, "flux"), "/tmp/ui-playground.png")  # the README's picture


def test_whisper_shows_segments_with_timestamps_as_they_decode_then_the_transcript(page: Page, tmp_path: Path) -> None:
    speak("I would like a cup of coffee. Please call me tomorrow morning.", tmp_path / "speech.wav")
    whisper = panel(page, "whisper")
    whisper.locator(".audio-file").set_input_files(str(tmp_path / "speech.wav"))
    whisper.locator("button.stream").click()
    assert wait_for_state(page, "whisper", "done", "error") == "done", whisper.locator(".panel-error").inner_text()
    assert_live_before_result(updates(page, "whisper"), "segment")
    assert re.match(r"\[\d+\.\d\d \u2013 \d+\.\d\d\]", whisper.locator(".segment .time").first.inner_text())
    transcript = whisper.locator(".transcript").inner_text().lower()
    assert "coffee" in transcript and "tomorrow" in transcript, transcript
    shoot(page, "whisper")


def test_whisper_transcribes_a_recording_from_the_microphone(page: Page) -> None:
    whisper = panel(page, "whisper")
    whisper.locator("button.record").click()
    page.wait_for_function("() => document.querySelector('#panel-whisper button.record').textContent !== 'Record'")
    page.wait_for_timeout(1500)
    whisper.locator("button.record").click()  # stops it: the recording becomes the audio to send
    page.wait_for_function(
        "() => document.querySelector('#panel-whisper .audio-chosen').textContent.startsWith('recording')"
    )
    whisper.locator("button.predict").click()
    assert wait_for_state(page, "whisper", "done", "error") == "done", whisper.locator(".panel-error").inner_text()
    assert updates(page, "whisper")[-1] == "result"


def test_textgen_chat_shows_tokens_as_they_come_then_the_reply(page: Page) -> None:
    textgen = panel(page, "textgen")
    textgen.locator("textarea.message").fill("Tell me about the sea.")
    field(page, "textgen", "max_new_tokens").fill("12")
    textgen.locator("button.stream").click()
    assert wait_for_state(page, "textgen", "done", "error") == "done", textgen.locator(".panel-error").inner_text()
    kinds = updates(page, "textgen")
    assert_live_before_result(kinds, "token")
    assert kinds.count("token") >= 2, kinds
    assert textgen.locator(".turn.user").inner_text() == "user: Tell me about the sea."
    assert textgen.locator(".turn.assistant .text").inner_text().strip()
    assert re.search(r"\d+ tokens", textgen.locator(".turn.assistant .note").inner_text())
    shoot(page, "textgen")


def test_the_stop_button_drops_a_textgen_stream_and_the_server_stops_the_model(
    page: Page, together_server: Server
) -> None:
    textgen = panel(page, "textgen")
    field(page, "textgen", "max_new_tokens").fill("20000")  # far longer than the test waits
    textgen.locator("button.stream").click()
    page.wait_for_function(
        "() => window.sheafUi.updates.filter((u) => u.deployment === 'textgen' && u.kind === 'token').length >= 3",
        timeout=RUN_S * 1000,
    )
    request_id = textgen.get_attribute("data-request-id")
    textgen.locator("button.stop").click()
    assert wait_for_state(page, "textgen", "stopped", timeout_s=5) == "stopped"
    assert "(stopped)" in textgen.locator(".turn.assistant .note").last.inner_text()
    deadline = time.monotonic() + 30
    while not re.search(rf"stream {request_id} cancelled after \d+ tokens", together_server.log_text()):
        assert time.monotonic() < deadline, together_server.log_text()[-3000:]
        time.sleep(0.2)


def test_forecast_plots_history_mean_and_band_with_one_point_per_step(page: Page) -> None:
    forecast = panel(page, "forecast")
    field(page, "forecast", "horizon").fill("12")
    field(page, "forecast", "output_mode").select_option("quantiles")
    forecast.locator("button.stream").click()
    assert wait_for_state(page, "forecast", "done", "error") == "done", forecast.locator(".panel-error").inner_text()
    assert updates(page, "forecast")[-1] == "result"
    plot = forecast.locator("svg.plot")
    assert plot.locator("circle.mean-point").count() == 12
    assert points(plot.locator("polyline.mean")) == 12
    assert points(plot.locator("polyline.history")) == 36  # the last three horizons of the 48 typed
    assert plot.locator("polygon.band").count() == 1
    shoot(page, "forecast")


def test_forecast_takes_its_history_from_the_feature_store(page: Page) -> None:
    forecast = panel(page, "forecast")
    forecast.locator("select.history-source").select_option("feature_ref")
    field(page, "forecast", "horizon").fill("6")
    forecast.locator("button.stream").click()
    assert wait_for_state(page, "forecast", "done", "error") == "done", forecast.locator(".panel-error").inner_text()
    assert forecast.locator("svg.plot circle.mean-point").count() == 6
    assert "from the feature store" in forecast.locator(".caption").inner_text()


def test_a_bad_field_shows_its_422_message_by_the_field(page: Page) -> None:
    flux = panel(page, "flux")
    field(page, "flux", "width").fill("60")
    flux.locator("button.stream").click()
    assert wait_for_state(page, "flux", "error", "done") == "error"
    message = flux.locator('.field-error[data-field="width"]').inner_text()
    assert "multiple of 8" in message, message
    assert "422" in flux.locator(".panel-error").inner_text()
    assert flux.locator('.field-error[data-field="height"]').inner_text() == ""


def test_an_error_mid_stream_shows_as_such(page: Page) -> None:
    textgen = panel(page, "textgen")
    field(page, "textgen", "model_name").fill("fail-mid-stream")  # tests/faults.py: fails after two events
    field(page, "textgen", "max_new_tokens").fill("20")
    textgen.locator("button.stream").click()
    assert wait_for_state(page, "textgen", "error", "done") == "error"
    assert updates(page, "textgen")[-1] == "error"
    assert "stream error (backend_error)" in textgen.locator(".panel-error").inner_text()


def test_a_full_deployment_shows_busy_with_its_retry_after(page: Page, together_server: Server) -> None:
    # Every stream seat of textgen (max_streams 8) held by other clients, each until told to leave.
    leave, opened = threading.Event(), threading.Semaphore(0)

    def hold_a_stream() -> None:
        body: dict[str, Any] = {"prompt": "the sea", "max_new_tokens": 20000}
        with httpx.stream("POST", f"{together_server.url}/textgen/stream", json=body, timeout=60) as response:
            opened.release()
            if response.status_code == 200:
                for _ in response.iter_raw():
                    if leave.is_set():
                        return

    holders = [threading.Thread(target=hold_a_stream) for _ in range(8)]
    for holder in holders:
        holder.start()
    try:
        for _ in holders:
            assert opened.acquire(timeout=30)
        textgen = panel(page, "textgen")
        textgen.locator("button.stream").click()
        assert wait_for_state(page, "textgen", "error", "done") == "error"
        assert textgen.locator(".panel-error").inner_text() == "busy, retry in 2 s"
    finally:
        leave.set()
        for holder in holders:
            holder.join(timeout=30)


def test_a_flux_job_goes_on_showing_after_a_reload(page: Page, together_server: Server) -> None:
    flux = panel(page, "flux")
    field(page, "flux", "height").fill("32")
    field(page, "flux", "width").fill("32")
    field(page, "flux", "num_inference_steps").fill("6")
    field(page, "flux", "model_name").fill("slow-stream")  # tests/faults.py: a second per step after the first
    flux.locator("button.job").click()
    page.wait_for_function("() => window.sheafUi.updates.some((u) => u.deployment === 'flux' && u.kind === 'progress')")
    job_id = flux.get_attribute("data-job-id")
    assert job_id
    page.reload()
    open_playground(page, together_server)
    flux = panel(page, "flux")
    assert flux.get_attribute("data-job-id") == job_id  # reattached from localStorage
    assert wait_for_state(page, "flux", "done", "error") == "done", flux.locator(".panel-error").inner_text()
    assert_live_before_result(updates(page, "flux"), "progress", count=6)
    assert image_size(flux.locator(".result-image")) == (32, 32)
    shoot(page, "flux", "flux-job")


def test_the_forms_show_each_schemas_defaults_and_limits(page: Page) -> None:
    # From the request schemas (sheaf/api): default, bounds and step on the input, the limits written by it.
    steps = field(page, "flux", "num_inference_steps")
    assert steps.input_value() == "4"
    assert (steps.get_attribute("min"), steps.get_attribute("max")) == ("1", "200")
    assert limits(page, "flux", "num_inference_steps") == "≥ 1, ≤ 200"
    width = field(page, "flux", "width")
    assert (width.input_value(), width.get_attribute("step")) == ("512", "8")
    assert limits(page, "flux", "width") == "≥ 8, ≤ 4096; multiple of 8"
    assert field(page, "flux", "seed").input_value() == ""  # null: the server picks one
    assert "optional" in limits(page, "flux", "seed")
    assert field(page, "textgen", "max_new_tokens").input_value() == "64"
    assert limits(page, "textgen", "max_new_tokens") == "≥ 1, ≤ 32768"
    assert limits(page, "textgen", "top_p") == "> 0, ≤ 1"  # exclusive: 0 is refused
    assert field(page, "forecast", "horizon").input_value() == "24"
    assert limits(page, "forecast", "horizon") == "> 0, ≤ 10000"
    assert field(page, "forecast", "output_mode").input_value() == "mean"
    assert field(page, "forecast", "quantile_levels").input_value() == "0.1, 0.5, 0.9"
    # The deployment's own limits (its config), in the panel's header.
    header = panel(page, "textgen").locator(".deployment-limits").inner_text()
    assert "max_streams: 8" in header and "max_new_tokens_limit: 30000" in header
    # The adapters offered are the deployment's configured ones.
    adapters = panel(page, "flux").locator(".adapter")
    assert [adapters.nth(i).get_attribute("value") for i in range(adapters.count())] == ["a", "b"]


def test_predict_shows_each_result_and_the_chosen_adapter_reaches_the_server(page: Page) -> None:
    flux, textgen, forecast = panel(page, "flux"), panel(page, "textgen"), panel(page, "forecast")
    field(page, "flux", "height").fill("32")
    field(page, "flux", "width").fill("48")
    field(page, "flux", "num_inference_steps").fill("2")
    field(page, "flux", "seed").fill("11")
    flux.locator(".adapters-default").uncheck()
    flux.locator('.adapter[value="b"]').check()
    flux.locator('.adapter-choice:has(.adapter[value="b"]) .adapter-weight').fill("0.5")
    textgen.locator("textarea.message").fill("Tell me about the sea.")
    field(page, "textgen", "max_new_tokens").fill("8")
    field(page, "forecast", "horizon").fill("6")
    field(page, "forecast", "output_mode").select_option("quantiles")

    def predicted(name: str) -> Callable[[Response], bool]:
        return lambda response: response.url.endswith(f"/{name}/predict")

    # The three at once, each by its Predict button: one page, one wait.
    with (
        page.expect_response(predicted("flux")) as flux_answer,
        page.expect_response(predicted("textgen")) as textgen_answer,
        page.expect_response(predicted("forecast")) as forecast_answer,
    ):
        for each in (flux, textgen, forecast):
            each.locator("button.predict").click()
    for name, each in (("flux", flux), ("textgen", textgen), ("forecast", forecast)):
        assert wait_for_state(page, name, "done", "error") == "done", each.locator(".panel-error").inner_text()
        assert updates(page, name) == ["result"]  # one answer, nothing live before it

    image = flux_answer.value
    assert image.status == 200
    sent = image.request.post_data_json
    assert sent is not None and (sent["adapters"], sent["adapter_weights"]) == (["b"], [0.5])
    assert image.json()["metadata"]["adapters"] == {"b": 0.5}  # what the server ran with
    assert image_size(flux.locator(".result-image")) == (48, 32)
    assert flux.locator(".seed").inner_text() == "seed 11 \u00b7 48\u00d732"

    reply = textgen_answer.value.json()
    assert reply["text"] and textgen.locator(".turn.assistant .text").text_content() == reply["text"]
    note = textgen.locator(".turn.assistant .note").inner_text()
    assert note.strip() == f"({reply['finish_reason']}, {reply['completion_tokens']} tokens)"

    assert forecast_answer.value.status == 200
    plot = forecast.locator("svg.plot")
    assert plot.locator("circle.mean-point").count() == 6
    assert points(plot.locator("polyline.mean")) == 6
    assert points(plot.locator("polyline.history")) == 24  # at least 24 of the 48 typed values
    assert plot.locator("polygon.band").count() == 1
    assert forecast.locator(".caption").inner_text().startswith("6 steps of 1h; history 48 values")
