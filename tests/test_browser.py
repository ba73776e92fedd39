"""The shopper's page (GET /) in a real headless Chromium, driven by Selenium.

Debian's `chromium` and `chromium-driver` (apt) are used as installed: the driver path and the
browser binary are given explicitly, so Selenium Manager never downloads anything. The module
skips when either is absent. Screenshots land in test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
WAIT_S = 60  # a search on a busy 2-core machine can take a few seconds

pytestmark = pytest.mark.integration

# CI sets REQUIRE_BROWSER=1 so that a missing browser fails the run instead of skipping it.
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    if os.environ.get("REQUIRE_BROWSER") == "1":
        raise RuntimeError("REQUIRE_BROWSER=1 but /usr/bin/chromium or chromedriver is missing")
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium "
                "chromium-driver)", allow_module_level=True)
pytest.importorskip("selenium", reason="needs selenium (pip install -e '.[dev]')")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--disable-dev-shm-usage", "--window-size=1280,1400",
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    os.environ.setdefault("SE_OFFLINE", "true")  # belt and braces: Selenium Manager stays offline
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def demo_photo(service, tmp_path_factory) -> Path:
    """The stored photo of demo-0005, as a file the browser can upload."""
    r = httpx.get(f"{service}/images/demo-0005", timeout=60)
    assert r.status_code == 200
    path = tmp_path_factory.mktemp("photos") / "demo-0005.jpg"
    path.write_bytes(r.content)
    return path


# -- helpers ---------------------------------------------------------------------------------

def wait(driver, condition, message: str = ""):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition, message)


def open_page(driver, service: str, path: str = "/") -> None:
    """Load the page and wait until its script has loaded the filter menus."""
    driver.get(service + path)
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "html").get_attribute("data-ready"),
         "page script never became ready")


def search_count(driver) -> int:
    return int(driver.find_element(By.ID, "results").get_attribute("data-search-count"))


def wait_search(driver, before: int) -> str:
    """Wait for the search after `before` to finish; returns 'done' or 'error'."""
    def finished(d):
        results = d.find_element(By.ID, "results")
        state = results.get_attribute("data-state")
        after = int(results.get_attribute("data-search-count"))
        return state if after > before and state in ("done", "error") else False

    state = wait(driver, finished, "the search never finished")
    assert not driver.find_element(By.ID, "busy").is_displayed()
    return state


def results(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#results .result")


def query_of(driver) -> dict[str, list[str]]:
    return parse_qs(urlsplit(driver.current_url).query)


def error_text(driver) -> str:
    error = driver.find_element(By.ID, "error")
    return error.text if error.is_displayed() else ""


def wait_images_loaded(driver) -> None:
    wait(driver, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img, #similar-to img')]"
        ".filter(i => i.getBoundingClientRect().top < innerHeight)"
        ".every(i => i.complete && i.naturalWidth > 0)"), "result photos did not load")


def save_element_screenshot(driver, element_id: str, name: str) -> None:
    """Screenshot one element whole: the window grows to the page's height for the shot."""
    size = driver.get_window_size()
    width, height = size["width"], size["height"]
    page_height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(max(height, page_height + 200), 6000))
    try:
        wait_images_loaded(driver)
        ARTIFACTS.mkdir(exist_ok=True)
        driver.find_element(By.ID, element_id).screenshot(str(ARTIFACTS / name))
    finally:
        driver.set_window_size(width, height)


def assert_no_script_errors(driver) -> None:
    """No JavaScript exceptions in the console (failed requests the page handled are fine)."""
    errors = [e["message"] for e in driver.get_log("browser")
              if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]
    assert not errors, errors


# -- tests -----------------------------------------------------------------------------------

def test_photo_upload_finds_its_own_product_first(browser, service, demo_photo):
    open_page(browser, service)
    before = search_count(browser)
    browser.find_element(By.ID, "photo-input").send_keys(str(demo_photo))
    assert wait_search(browser, before) == "done", error_text(browser)

    found = results(browser)
    assert found and found[0].get_attribute("data-id") == "demo-0005"
    assert browser.find_element(By.ID, "photo-preview").is_displayed()
    # The score shown is the one the list is ranked by: the own product's is the top one.
    shown = [float(r.find_element(By.CLASS_NAME, "result-score").get_attribute("data-value"))
             for r in found]
    assert shown == sorted(shown, reverse=True) and shown[0] > shown[1] and 0 < shown[0] <= 1
    assert len(found) == int(Select(browser.find_element(By.ID, "k")).first_selected_option
                             .get_attribute("value"))
    assert "q" not in query_of(browser) and "similar" not in query_of(browser)
    wait_images_loaded(browser)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "page-photo.png"))
    assert_no_script_errors(browser)


def test_photo_and_description_together(browser, service, demo_photo):
    open_page(browser, service)
    browser.find_element(By.ID, "query").send_keys("dress")
    before = search_count(browser)
    browser.find_element(By.ID, "photo-input").send_keys(str(demo_photo))
    assert wait_search(browser, before) == "done", error_text(browser)
    ids = [r.get_attribute("data-id") for r in results(browser)]
    assert "demo-0005" in ids
    scores = browser.find_elements(By.CSS_SELECTOR, "#results .result-score")
    assert any("photo" in s.text for s in scores) and any("text" in s.text for s in scores)
    assert "your photo and" in browser.find_element(By.ID, "summary").text
    assert query_of(browser)["q"] == ["dress"]  # the text part of the search can be shared
    assert_no_script_errors(browser)


def test_typed_description_then_colour_filter(browser, service):
    open_page(browser, service)
    before = search_count(browser)
    box = browser.find_element(By.ID, "query")
    box.send_keys("red dress", Keys.ENTER)  # the keyboard path: Enter submits
    assert wait_search(browser, before) == "done", error_text(browser)
    found = results(browser)
    assert found, "no results for 'red dress'"
    first = found[0]
    assert first.find_element(By.CLASS_NAME, "result-title").text
    assert first.find_element(By.CLASS_NAME, "result-colour").get_attribute("data-value") == "Red"
    assert first.find_element(By.CLASS_NAME, "result-type").text == "Dresses"
    assert first.find_element(By.CLASS_NAME, "result-score").text.startswith("score ")
    assert query_of(browser)["q"] == ["red dress"]

    # The artifacts: the results grid (whole, photos loaded) and the page as a shopper sees it.
    wait_images_loaded(browser)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "page-desktop.png"))
    save_element_screenshot(browser, "results-section", "results-grid.png")

    before = search_count(browser)
    Select(browser.find_element(By.ID, "filter-colour")).select_by_value("Blue")
    assert wait_search(browser, before) == "done", error_text(browser)
    found = results(browser)
    colours = [r.find_element(By.CLASS_NAME, "result-colour").get_attribute("data-value")
               for r in found]
    assert colours and set(colours) == {"Blue"}
    assert all(r.find_element(By.CLASS_NAME, "result-colour").text == "Blue" for r in found)
    assert query_of(browser)["colour"] == ["Blue"] and query_of(browser)["q"] == ["red dress"]
    assert_no_script_errors(browser)


def test_clicking_a_result_loads_more_like_it(browser, service):
    open_page(browser, service, "/?q=striped+t-shirt&k=6")
    wait(browser, lambda d: search_count(d) >= 1 and results(d))
    picked = results(browser)[1]
    picked_id = picked.get_attribute("data-id")
    picked_type = picked.find_element(By.CLASS_NAME, "result-type").text
    picked_colour = picked.find_element(By.CLASS_NAME, "result-colour").get_attribute(
        "data-value")

    before = search_count(browser)
    picked.find_element(By.CSS_SELECTOR, "a.result-link").click()
    assert wait_search(browser, before) == "done", error_text(browser)
    assert query_of(browser)["similar"] == [picked_id]
    similar_to = browser.find_element(By.ID, "similar-to")
    assert similar_to.is_displayed() and similar_to.get_attribute("data-id") == picked_id
    found = results(browser)
    ids = [r.get_attribute("data-id") for r in found]
    assert len(ids) == 6 and picked_id not in ids
    # Ranking weighs colour too: the best match shares the type or the colour, and most of the
    # results share the type.
    first = found[0]
    assert (first.find_element(By.CLASS_NAME, "result-type").text == picked_type
            or first.find_element(By.CLASS_NAME, "result-colour").get_attribute("data-value")
            == picked_colour)
    types = [r.find_element(By.CLASS_NAME, "result-type").text for r in found]
    assert types.count(picked_type) >= len(types) // 2, types
    wait_images_loaded(browser)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "page-similar.png"))

    # Keyboard: Enter on a focused result does the same; Back returns to the first product.
    again = found[0]
    again_id = again.get_attribute("data-id")
    before = search_count(browser)
    again.find_element(By.CSS_SELECTOR, "a.result-link").send_keys(Keys.ENTER)
    assert wait_search(browser, before) == "done"
    assert query_of(browser)["similar"] == [again_id]

    before = search_count(browser)
    browser.back()
    wait_search(browser, before)
    assert query_of(browser)["similar"] == [picked_id]
    assert browser.find_element(By.ID, "similar-to").get_attribute("data-id") == picked_id
    assert_no_script_errors(browser)


def test_shared_url_runs_its_search_on_load_and_reload(browser, service):
    open_page(browser, service, "/?q=red+dress&colour=Red&k=12")
    wait(browser, lambda d: search_count(d) >= 1)
    assert browser.find_element(By.ID, "results").get_attribute("data-state") == "done"
    assert browser.find_element(By.ID, "query").get_attribute("value") == "red dress"
    assert Select(browser.find_element(By.ID, "filter-colour")).first_selected_option \
        .get_attribute("value") == "Red"
    colours = {e.get_attribute("data-value")
               for e in browser.find_elements(By.CSS_SELECTOR, "#results .result-colour")}
    assert colours == {"Red"}

    browser.refresh()
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "html").get_attribute("data-ready"))
    wait(browser, lambda d: search_count(d) >= 1 and results(d))
    assert query_of(browser)["q"] == ["red dress"]

    open_page(browser, service, "/?similar=demo-0021&k=4")
    wait(browser, lambda d: search_count(d) >= 1 and results(d))
    assert len(results(browser)) == 4
    assert browser.find_element(By.ID, "similar-to").get_attribute("data-id") == "demo-0021"
    assert_no_script_errors(browser)


def test_text_file_named_jpg_shows_the_api_message(browser, service, tmp_path):
    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is a shopping list, not a photo\n")
    open_page(browser, service)
    before = search_count(browser)
    browser.find_element(By.ID, "photo-input").send_keys(str(fake))
    assert wait_search(browser, before) == "error"
    message = error_text(browser)
    assert "not a readable image; accepted formats: JPEG" in message  # the API's 415 message
    assert "holiday.jpg" in message
    assert not results(browser)
    assert not browser.find_element(By.ID, "photo-preview").is_displayed()  # refused: dropped
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "page-error.png"))
    assert_no_script_errors(browser)


def test_more_filters_reach_typed_and_json_attributes(browser, service):
    open_page(browser, service, "/?q=t-shirt&season=Summer&attr.pattern=Solid&k=6")
    wait(browser, lambda d: search_count(d) >= 1)
    assert browser.find_element(By.ID, "results").get_attribute("data-state") == "done", \
        error_text(browser)
    for select_id, value in (("filter-season", "Summer"), ("filter-pattern", "Solid")):
        assert Select(browser.find_element(By.ID, select_id)).first_selected_option \
            .get_attribute("value") == value
    ids = [r.get_attribute("data-id") for r in results(browser)]
    assert ids
    with httpx.Client(base_url=service, timeout=60) as client:
        found = [client.get(f"/products/{i}").json()["attributes"] for i in ids]
    assert {a["season"] for a in found} == {"Summer"}
    assert {a["pattern"] for a in found} == {"Solid"}


def test_a_typed_field_and_a_json_attribute_of_one_name_get_their_own_menus(browser, service):
    """`colour` (the shop's typed field) and `attr.colour` (a JSON attribute of that name) are
    two filters: each gets its own menu, and each menu's label points at it (unique ids)."""
    open_page(browser, service, "/?q=t-shirt&colour=White&attr.colour=White&k=6")
    wait(browser, lambda d: search_count(d) >= 1)
    menus = {s.get_attribute("data-param"): s for s in
             browser.find_elements(By.CSS_SELECTOR, "select[data-param]")}
    assert {"colour", "attr.colour"} <= set(menus)
    assert menus["colour"].get_attribute("id") != menus["attr.colour"].get_attribute("id")
    for param, menu in (("colour", menus["colour"]), ("attr.colour", menus["attr.colour"])):
        assert Select(menu).first_selected_option.get_attribute("value") == "White", param
        label = browser.find_element(By.CSS_SELECTOR, f"label[for='{menu.get_attribute('id')}']")
        assert label.get_attribute("textContent") == "Colour", param  # may be folded away
    duplicates = browser.execute_script(
        "const ids = [...document.querySelectorAll('[id]')].map((e) => e.id);"
        "return ids.filter((id, i) => ids.indexOf(id) !== i);")
    assert duplicates == []
    assert_no_script_errors(browser)


def test_unknown_product_and_empty_search_explain_themselves(browser, service):
    open_page(browser, service, "/?similar=no-such-product")
    wait(browser, lambda d: search_count(d) >= 1)
    assert "not in the catalogue" in error_text(browser)

    open_page(browser, service)
    browser.find_element(By.ID, "search-button").click()
    assert "photo" in error_text(browser) and "description" in error_text(browser)


@pytest.mark.parametrize(("fake_fetch", "kind"), [
    ("() => Promise.reject(new TypeError('Failed to fetch'))", "network down"),
    ("() => Promise.resolve(new Response(JSON.stringify({error: {code: 'unavailable', "
     "message: 'service busy or a component is down, retry'}}), {status: 503, "
     "headers: {'content-type': 'application/json', 'retry-after': '1'}}))", "503"),
])
def test_busy_or_down_service_gets_a_human_message(browser, service, fake_fetch, kind):
    open_page(browser, service)
    browser.execute_script(f"window.fetch = {fake_fetch};")
    before = search_count(browser)
    browser.find_element(By.ID, "query").send_keys("blue cap", Keys.ENTER)
    assert wait_search(browser, before) == "error", kind
    assert "busy or restarting, try again in a moment" in error_text(browser), kind
    assert browser.find_element(By.ID, "retry").is_displayed()


def test_phone_sized_screen(browser, service):
    browser.set_window_size(390, 844)
    try:
        open_page(browser, service, "/?q=sports+shoes&k=6")
        wait(browser, lambda d: search_count(d) >= 1 and len(results(d)) >= 3)
        wait_images_loaded(browser)
        first, second, third = (r.rect for r in results(browser)[:3])
        assert first["y"] == second["y"] and third["y"] > first["y"]  # two a row
        assert browser.execute_script(
            "return document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "page-phone.png"))
        browser.execute_script("document.getElementById('summary').scrollIntoView()")
        wait_images_loaded(browser)
        browser.save_screenshot(str(ARTIFACTS / "results-phone.png"))
    finally:
        browser.set_window_size(1280, 1400)


def test_too_large_photo_gets_a_human_message(browser, service, demo_photo):
    """The service's 413 (faked here: the real limit is 10 MB) becomes a plain sentence."""
    open_page(browser, service)
    browser.execute_script(
        "window.fetch = () => Promise.resolve(new Response(JSON.stringify({error: {code: "
        "'upload_too_large', message: 'upload is larger than 10485760 bytes; send a smaller "
        "image'}}), {status: 413, headers: {'content-type': 'application/json'}}));")
    before = search_count(browser)
    browser.find_element(By.ID, "photo-input").send_keys(str(demo_photo))
    assert wait_search(browser, before) == "error"
    assert "That photo is too large" in error_text(browser)


def test_a_fit_shows_predicted_attributes_and_found_by_its_photo(browser, service,
                                                                  service_settings, auth_headers):
    """After a fit, a product stored untitled and unlabelled shows its predicted colour and type
    marked as predicted, and a text search for them shows it "found by its photo"; a menu of
    the predicted colours narrows the results to products predicted so."""
    import json
    import shutil
    import time

    from batch_index.fit import run_fit
    from batch_index.service import search_handle
    from deployments.core.demo import draw_product
    from tests.support import jpeg_bytes

    settings = service_settings.model_copy(update={"heads": service_settings.heads.model_copy(
        update={"min_products": 10, "min_field_products": 10, "min_class_products": 2})})
    heads = run_fit(settings, search_handle())
    folder = f"{service_settings.heads.dir}/{service_settings.milvus.collection}"
    try:
        wait_until = time.monotonic() + 30
        while (httpx.get(f"{service}/healthz", timeout=10).json().get("heads") or {}).get(
                "version") != heads.version:
            assert time.monotonic() < wait_until, "the new fit was not picked up"
            time.sleep(0.25)
        photo = jpeg_bytes(draw_product("Dresses", "Red", "Solid", seed=9002))
        r = httpx.post(f"{service}/products", files={"image": ("u.jpg", photo, "image/jpeg")},
                       data={"product": json.dumps({"id": "untitled-9002",
                                                    "title": "IMG_9002"})},
                       headers=auth_headers, timeout=60)
        assert r.status_code == 201, r.text
        predicted = r.json()["predicted"]
        wait_until = time.monotonic() + 30  # the predicted values recounted after the backfill
        while len(httpx.get(f"{service}/attributes", timeout=10).json().get(
                "predicted.colour", {})) < 2:  # a menu needs two values to choose from
            assert time.monotonic() < wait_until, "predicted colours not listed"
            time.sleep(0.25)

        open_page(browser, service)
        before = search_count(browser)
        browser.find_element(By.ID, "query").send_keys("red dress", Keys.ENTER)
        assert wait_search(browser, before) == "done", error_text(browser)
        cards = {card.get_attribute("data-id"): card for card in results(browser)}
        assert "untitled-9002" in cards, list(cards)
        card = cards["untitled-9002"]
        shown = {p.get_attribute("data-field"): p for p in
                 card.find_elements(By.CLASS_NAME, "result-predicted")}
        assert {"colour", "article_type"} <= set(shown)
        assert shown["colour"].get_attribute("data-value") == predicted["colour"]["value"]
        assert "predicted" in shown["colour"].text
        assert card.find_element(By.CLASS_NAME, "result-found-by").text == "found by its photo"
        assert not card.find_elements(By.CLASS_NAME, "result-colour")  # no label of its own
        wait_images_loaded(browser)
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "page-predicted.png"))

        # The predicted colours get a menu, marked as predictions; choosing one narrows the
        # results to products predicted so, by the filter's query-string name.
        value = predicted["colour"]["value"]
        browser.find_element(By.CSS_SELECTOR, "#more-filters summary").click()
        label = browser.find_element(By.CSS_SELECTOR, "label[for='filter-predicted-colour']")
        assert label.text == "Colour (predicted)"
        before = search_count(browser)
        Select(browser.find_element(By.ID, "filter-predicted-colour")).select_by_value(value)
        assert wait_search(browser, before) == "done", error_text(browser)
        ids = [card.get_attribute("data-id") for card in results(browser)]
        assert "untitled-9002" in ids
        with httpx.Client(base_url=service, timeout=60) as client:
            guesses = {client.get(f"/products/{i}").json()["predicted"]["colour"]["value"]
                       for i in ids}
        assert guesses == {value}
        assert query_of(browser)["predicted.colour"] == [value]
        assert f"colour (predicted): {value}" in browser.find_element(By.ID, "summary").text
        wait_images_loaded(browser)
        browser.save_screenshot(str(ARTIFACTS / "page-predicted-filter.png"))
        # The URL round-trips: loading it sets the menu and runs the same search.
        open_page(browser, service, urlsplit(browser.current_url).path + "?"
                  + urlsplit(browser.current_url).query)
        wait(browser, lambda d: search_count(d) >= 1)
        assert Select(browser.find_element(By.ID, "filter-predicted-colour")) \
            .first_selected_option.get_attribute("value") == value
        assert [card.get_attribute("data-id") for card in results(browser)] == ids

        # "Predictions at least 50% sure" keeps only predictions that sure: every one of the
        # list before that was, and nothing less sure.
        with httpx.Client(base_url=service, timeout=60) as client:
            sure = {i for i in ids
                    if client.get(f"/products/{i}").json()["predicted"]["colour"]["confidence"]
                    >= 0.5}
        browser.find_element(By.CSS_SELECTOR, "#more-filters summary").click()  # reloaded
        before = search_count(browser)
        Select(browser.find_element(By.CSS_SELECTOR, "select[data-param="
                                    "'predicted_confidence_min']")).select_by_value("0.5")
        assert wait_search(browser, before) == "done", error_text(browser)
        assert query_of(browser)["predicted_confidence_min"] == ["0.5"]
        assert "predictions at least 50% sure" in browser.find_element(By.ID, "summary").text
        kept = [card.get_attribute("data-id") for card in results(browser)]
        with httpx.Client(base_url=service, timeout=60) as client:
            shown = [client.get(f"/products/{i}").json()["predicted"]["colour"] for i in kept]
        assert all(p["value"] == value and p["confidence"] >= 0.5 for p in shown), shown
        assert sure <= set(kept)
        assert_no_script_errors(browser)
    finally:
        httpx.delete(f"{service}/products/untitled-9002", headers=auth_headers, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
        wait_until = time.monotonic() + 30  # the service searches without heads again
        while httpx.get(f"{service}/healthz", timeout=10).json().get("heads") is not None:
            assert time.monotonic() < wait_until, "the removed fit is still in use"
            time.sleep(0.25)
