"""Drive the real Prefect and MLflow web UIs from headless Chromium (selenium).

Helpers for the end-to-end test, written against Prefect 3.8.8 (its default "V2" React UI,
served under `/v2`) and MLflow 3.17:

- `chromium_driver(tmp_path)`: a context manager yielding a selenium webdriver for the
  system Chromium (`/usr/bin/chromium` + `/usr/bin/chromedriver`), with a fresh profile and
  the flags a closed network needs. Skips the test only if Chromium, chromedriver or the
  `selenium` package is missing.
- `run_deployment_from_ui(driver, ui_url, flow, deployment, fields)`: opens the deployment
  from the Deployments page, Run -> Custom run, fills the parameter form built from the
  flow's JSON schema, submits and returns the URL of the new flow run.
- `wait_for_run_state(driver, run_url, "Completed")`: reads the state badge of the flow run
  page until it shows the state; fails fast on Failed / Crashed / Cancelled / TimedOut.
- `mlflow_ui_model_aliases(driver, mlflow_url, model_name)`: the aliases the registered
  model's page shows, as {alias: version}.

Every failure saves a screenshot, the page source and the browser console log under the
artifact directory (`<tmp_path>/browser` for a driver from `chromium_driver`) and raises
`BrowserStepError` with their paths, the URL and any toast messages in the text.

Selectors are chosen to survive restyling: visible text, `<label for=...>` associations,
ARIA roles and labels (`role=menuitem`, `role=option`, `role=switch`, `aria-haspopup`),
`href` patterns and input names; never generated CSS classes. The Prefect UI must know its
own API address: start `prefect server start --port P` with
`PREFECT_SERVER_UI_API_URL=http://127.0.0.1:P/api` (or `PREFECT_API_URL`), otherwise the
UI calls port 4200; `run_deployment_from_ui` checks this first.

Field values for the parameter form (`fields`): keys are field names (`image_size`) or the
labels the form shows (`Image Size`), matched case-insensitively with `_` as a space and
without the "(Optional)" suffix; the deployment's parameter schema (read from the API) adds
the titles the form uses instead, e.g. the model name "GuardConfig" that labels a field
`guard: GuardConfig`. A dotted key (`params.guard.max_bytes`) or a dict value
(`{"params": {...}}`) scopes to a nested object; a plain key may match at any depth if it
is unique. str -> text box, int/float -> number box, bool -> switch, a str/int for a select
-> the option with that text, a list of scalars -> the list's items (existing items are
deleted, then one "Add item" per value), a union such as `str | None` -> its type tab
("str", "None"), then the value. Anything else, or a value wrapped in `JsonInput(...)`, is
typed as JSON after the field's menu item "Use JSON Input". Every value is read back from
the form before submitting.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Without the background-networking flags Chromium hangs on a closed network.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)

# Prefect states that end a flow run without reaching the one waited for.
PREFECT_BAD_STATES = ("Failed", "Crashed", "Cancelled", "TimedOut")

POLL_S = 0.25

log = logging.getLogger(__name__)


class BrowserStepError(AssertionError):
    """A UI step failed; the message names the screenshot and page source saved for it."""


class JsonInput:
    """Wraps a field value to set it through the field's "Use JSON Input" editor."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"JsonInput({self.value!r})"


# --------------------------------------------------------------------------- the driver


@contextlib.contextmanager
def chromium_driver(tmp_path: Path | str, *, window_size: tuple[int, int] = (1400, 1000),
                    page_load_timeout_s: float = 60) -> Iterator[Any]:
    """Yield a headless Chromium webdriver; artifacts of failures go under tmp_path/browser."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the Python package selenium")
    if missing:
        pytest.skip("browser e2e needs " + ", ".join(missing)
                    + " (apt-get install chromium chromium-driver; pip install selenium)")

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tmp_path = Path(tmp_path)
    artifacts = tmp_path / "browser"
    artifacts.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)

    options = webdriver.ChromeOptions()
    # Both paths set explicitly, so selenium-manager never tries to download a browser.
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={window_size[0]},{window_size[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(artifacts / "chromedriver.log"))

    driver = webdriver.Chrome(service=service, options=options)
    driver.e2e_artifacts = artifacts
    try:
        driver.set_page_load_timeout(page_load_timeout_s)
        yield driver
    finally:
        try:
            driver.quit()
        except Exception:  # noqa: BLE001 - the browser may already be gone
            service.stop()
        shutil.rmtree(profile, ignore_errors=True)


# --------------------------------------------------------------------------- failures


def _artifact_dir(driver) -> Path:
    path = getattr(driver, "e2e_artifacts", None)
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="browser-e2e-"))
        driver.e2e_artifacts = path
    return Path(path)


def save_artifacts(driver, step: str) -> dict[str, Path]:
    """Save screenshot, page source and console log of the current page; return their paths."""
    base = _artifact_dir(driver)
    count = driver.e2e_saved = getattr(driver, "e2e_saved", 0) + 1
    stem = f"{count:02d}-{time.strftime('%H%M%S')}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', step)[:60]}"
    paths = {"screenshot": base / f"{stem}.png", "page source": base / f"{stem}.html",
             "console": base / f"{stem}.console.txt"}
    with contextlib.suppress(Exception):
        driver.save_screenshot(str(paths["screenshot"]))
    with contextlib.suppress(Exception):
        paths["page source"].write_text(driver.page_source, encoding="utf-8")
    with contextlib.suppress(Exception):
        paths["console"].write_text("\n".join(_console(driver)) + "\n", encoding="utf-8")
    return {name: path for name, path in paths.items() if path.exists()}


def _console(driver) -> list[str]:
    """Every browser console line so far (chromedriver hands each line out only once)."""
    lines = getattr(driver, "e2e_console", None)
    if lines is None:
        lines = driver.e2e_console = []
    with contextlib.suppress(Exception):
        lines.extend(f"{entry.get('level')} {entry.get('message')}" for entry in driver.get_log("browser"))
    return lines


def _toasts(driver) -> list[str]:
    """Texts of the notifications on screen (Prefect's toasts, MLflow's alerts)."""
    texts = []
    with contextlib.suppress(Exception):
        for element in driver.find_elements("xpath", "//*[@data-sonner-toast] | //*[@role='alert']"):
            text = " ".join(element.text.split())
            if text and text not in texts:
                texts.append(text)
    return texts


def _fail(driver, step: str, message: str, cause: BaseException | None = None) -> BrowserStepError:
    """Save artifacts and build the error to raise (callers write `raise _fail(...)`)."""
    paths = save_artifacts(driver, step)
    lines = [f"{step}: {message}"]
    with contextlib.suppress(Exception):
        lines.append(f"  url: {driver.current_url}")
    for text in _toasts(driver):
        lines.append(f"  notification on screen: {text}")
    if cause is not None:
        lines.append(f"  cause: {type(cause).__name__}: {' '.join(str(cause).split())[:500]}")
    for name, path in paths.items():
        lines.append(f"  {name}: {path}")
    error = BrowserStepError("\n".join(lines))
    error.artifacts = paths
    return error


def _wait(driver, step: str, condition: Callable[[], Any], timeout_s: float, what: str,
          *, poll_s: float = POLL_S) -> Any:
    """Poll condition() until it returns something truthy; stale/missing elements just retry."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        ElementNotInteractableException,
        NoSuchElementException,
        StaleElementReferenceException,
    )

    retry = (NoSuchElementException, StaleElementReferenceException,
             ElementNotInteractableException, ElementClickInterceptedException)
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            result = condition()
            if result:
                return result
        except BrowserStepError:
            raise
        except retry as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise _fail(driver, step, f"timed out after {timeout_s:.0f}s waiting for {what}", last_error)
        time.sleep(poll_s)


def _on_browser_error(step: str):
    """Decorator: a raw selenium error (page load timeout, browser gone) gets artifacts too."""
    def decorate(function):
        @functools.wraps(function)
        def wrapper(driver, *args, **kwargs):
            from selenium.common.exceptions import WebDriverException

            try:
                return function(driver, *args, **kwargs)
            except WebDriverException as exc:
                raise _fail(driver, step, f"{function.__name__} hit a browser error", exc) from exc
        return wrapper
    return decorate


def _visible(driver, xpath: str, root=None) -> list:
    root = driver if root is None else root
    return [element for element in root.find_elements("xpath", xpath) if element.is_displayed()]


def _first_visible(driver, xpath: str, root=None):
    found = _visible(driver, xpath, root)
    return found[0] if found else None


def _click(driver, element) -> None:
    """Click like a user; if something overlaps it, scroll it to the middle and use a JS click."""
    from selenium.common.exceptions import ElementClickInterceptedException, ElementNotInteractableException

    try:
        element.click()
    except (ElementClickInterceptedException, ElementNotInteractableException):
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        time.sleep(0.2)
        try:
            element.click()
        except (ElementClickInterceptedException, ElementNotInteractableException):
            driver.execute_script("arguments[0].click();", element)


def _click_until(driver, step: str, target: Callable[[], Any], done: Callable[[], Any],
                 timeout_s: float, what: str, *, retry_s: float = 3.0) -> Any:
    """Click target() until done() holds, clicking again every retry_s (an SPA can drop a click)."""
    last_click = [float("-inf")]

    def condition():
        result = done()
        if result:
            return result
        if time.monotonic() - last_click[0] >= retry_s:
            element = target()
            if element is not None:
                _click(driver, element)
                last_click[0] = time.monotonic()
        return None

    return _wait(driver, step, condition, timeout_s, what)


def _xpath_literal(text: str) -> str:
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    return "concat(" + ", \"'\", ".join(f"'{part}'" for part in text.split("'")) + ")"


def _norm(text: str) -> str:
    text = text.replace("\xa0", " ").replace("_", " ")
    text = re.sub(r"\s*\(optional\)\s*$", "", text.strip(), flags=re.IGNORECASE)
    return " ".join(text.split()).lower()


# --------------------------------------------------------------------------- Prefect


def _prefect_base(ui_url: str) -> str:
    base = ui_url.rstrip("/")
    for suffix in ("/v2", "/api"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


def _check_prefect_ui_settings(driver, base: str) -> str:
    """The UI must call this server's API (not the default :4200) and serve the V2 UI; return the API URL."""
    try:
        with urllib.request.urlopen(f"{base}/ui-settings", timeout=15) as response:
            settings = json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError) as exc:
        raise _fail(driver, "prefect-ui-settings", f"cannot read {base}/ui-settings", exc) from exc
    api_url = (settings.get("api_url") or "").rstrip("/")
    api_netloc = urllib.parse.urlsplit(api_url).netloc
    if api_netloc and api_netloc != urllib.parse.urlsplit(base).netloc:
        raise BrowserStepError(
            f"the Prefect UI at {base} calls the API at {api_url!r}: start the server with "
            f"PREFECT_SERVER_UI_API_URL={base}/api (or PREFECT_API_URL) in its environment")
    if "v2" not in (settings.get("available_uis") or ["v2"]):
        raise BrowserStepError(f"the Prefect server at {base} does not serve the V2 UI: {settings}")
    return urllib.parse.urljoin(base + "/", api_url or "/api")


def _field_titles(api_url: str, flow_name: str, deployment_name: str) -> dict[str, set[str]]:
    """{property name: titles the form may show for it}, from the deployment's parameter schema.

    The form labels a field by its schema title ("Url List" for url_list), but a field whose
    type is another model is labelled with that model's title ("GuardConfig" for guard).
    Best effort: an empty dict if the schema cannot be read.
    """
    quote = urllib.parse.quote
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/deployments/name/{quote(flow_name, safe='')}/"
                                    f"{quote(deployment_name, safe='')}", timeout=15) as response:
            schema = json.loads(response.read()).get("parameter_openapi_schema") or {}
    except (OSError, ValueError, urllib.error.URLError) as exc:
        log.warning("prefect ui: cannot read the parameter schema (%s); matching field names only", exc)
        return {}
    definitions = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    titles: dict[str, set[str]] = {}

    def referenced(node: Any) -> list[dict]:
        found = []
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                found.append(definitions.get(ref.rsplit("/", 1)[-1], {}))
            for key in ("allOf", "anyOf", "oneOf"):
                for item in node.get(key, []) or []:
                    found.extend(referenced(item))
        return found

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for name, prop in (node.get("properties") or {}).items():
                names = titles.setdefault(name, set())
                if isinstance(prop, dict) and isinstance(prop.get("title"), str):
                    names.add(prop["title"])
                for target in referenced(prop):
                    if isinstance(target.get("title"), str):
                        names.add(target["title"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return titles


def _open_deployment(driver, base: str, flow_name: str, deployment_name: str, timeout_s: float) -> None:
    step = "prefect-open-deployment"
    driver.get(f"{base}/v2/deployments")
    search = _wait(driver, step, lambda: _first_visible(
        driver, "//input[@placeholder='Search deployments' or @aria-label='Search deployments']"),
        timeout_s, "the deployments search box")
    search.send_keys(deployment_name)
    # The page puts the search into its URL once it applies it; clicking before that is lost.
    _wait_quiet(lambda: urllib.parse.quote_plus(deployment_name) in driver.current_url
                or urllib.parse.quote(deployment_name) in driver.current_url, 3)
    row_link = (
        f"//tr[.//a[contains(@href, '/flows/flow/')][normalize-space(.)={_xpath_literal(flow_name)}]]"
        f"//a[contains(@href, '/deployments/deployment/')][normalize-space(.)={_xpath_literal(deployment_name)}]")
    # The list re-renders while the search settles and can swallow a click: click until it lands.
    _click_until(driver, step, lambda: _first_visible(driver, row_link),
                 lambda: "/deployments/deployment/" in driver.current_url
                 and _first_visible(driver, "//button[normalize-space(.)='Run']"),
                 timeout_s, f"the deployment {flow_name}/{deployment_name} (from the deployments list) "
                            "to open with its Run button", retry_s=1.5)


def _open_custom_run(driver, timeout_s: float) -> None:
    step = "prefect-custom-run"
    custom_run = "//*[@role='menuitem'][normalize-space(.)='Custom run']"
    run_page = r"/deployments/deployment/[^/]+/run"
    _click_until(driver, step, lambda: _first_visible(driver, "//button[normalize-space(.)='Run']"),
                 lambda: _first_visible(driver, custom_run) or re.search(run_page, driver.current_url),
                 timeout_s, "the Run button's menu with 'Custom run'")
    _click_until(driver, step, lambda: _first_visible(driver, custom_run),
                 lambda: re.search(run_page, driver.current_url), timeout_s, "the custom run page")
    _wait(driver, step, lambda: _first_visible(driver, "//form//input[@name='name']")
          and _first_visible(driver, "//form//button[@type='submit'][normalize-space(.)='Submit']")
          and _parameter_labels(driver.find_element("xpath", "//form")),
          timeout_s, "the custom run form with its parameter fields")


def _parameter_labels(scope) -> list:
    """Labels of parameter fields under scope: each heads a block <div> whose <fieldset> holds the input."""
    return [label for label in scope.find_elements("xpath", ".//label[ancestor::div[fieldset]]")
            if label.is_displayed()]


def _block(label):
    return label.find_element("xpath", "./ancestor::div[fieldset][1]")


def _fieldset(block):
    return block.find_element("xpath", "./fieldset")


def _find_block(driver, scope, segment: str, path: str, step: str, titles: Mapping[str, set[str]]):
    """The field block whose label matches segment; scope is the form or a parent's fieldset."""
    wanted = {_norm(segment)} | {_norm(title) for title in titles.get(segment, ())}
    labels = [label for label in _parameter_labels(scope) if _norm(label.text) in wanted]
    if scope.tag_name == "fieldset":  # only this object's own fields, not deeper ones
        labels = [label for label in labels
                  if _block(label).find_element("xpath", "./ancestor::fieldset[1]") == scope]
    if not labels:
        shown = sorted({label.text.strip() for label in _parameter_labels(scope)})
        raise _fail(driver, step, f"no form field {segment!r} (for {path!r}); fields shown: {shown}")
    blocks = []
    for label in labels:
        block = _block(label)
        if block not in blocks:
            blocks.append(block)
    if len(blocks) > 1:
        raise _fail(driver, step, f"{len(blocks)} form fields are labelled {segment!r}: "
                    f"use a dotted key (parent.{segment}) for {path!r}")
    return blocks[0]


def _nested_labels(fieldset) -> list:
    """Field labels inside a field's fieldset: the field is an object (or a list of objects)."""
    return _parameter_labels(fieldset)


def _type_into(driver, element, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    _click(driver, element)
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.DELETE)
    if text:
        element.send_keys(text)


def _value_of(element) -> str:
    return element.get_property("value") or ""


def _same_number(shown: str, value: float) -> bool:
    try:
        return float(shown) == float(value)
    except ValueError:
        return False


def _set_json(driver, block, value: Any, path: str, timeout_s: float) -> None:
    """Switch the field to "Use JSON Input" (its header menu) and type the JSON."""
    step = f"prefect-field-{path}"
    editor_xpath = "./fieldset//*[@contenteditable='true']"
    if not _first_visible(driver, editor_xpath, block):
        header_menu = _wait(driver, step, lambda: _first_visible(
            driver, "./*[not(self::fieldset)]//button[@aria-haspopup='menu']", block),
            timeout_s, f"the menu of field {path!r}")
        _click(driver, header_menu)
        _click(driver, _wait(driver, step, lambda: _first_visible(
            driver, "//*[@role='menuitem'][normalize-space(.)='Use JSON Input']"),
            timeout_s, "the menu item 'Use JSON Input'"))
    editor = _wait(driver, step, lambda: _first_visible(driver, editor_xpath, block), timeout_s,
                   f"the JSON editor of field {path!r}")
    text = json.dumps(value)
    _type_into(driver, editor, text)

    def shown_json():
        shown = driver.execute_script(
            "const c = arguments[0];"
            "return (c.cmView && c.cmView.view) ? c.cmView.view.state.doc.toString() : c.innerText;",
            editor)
        try:
            return json.loads(shown) == value
        except ValueError:
            return False

    if not _wait_quiet(shown_json, 2.0):
        # The editor's auto-closing brackets mangled the typing: replace the document directly.
        driver.execute_script(
            "const v = arguments[0].cmView && arguments[0].cmView.view;"
            "if (v) v.dispatch({changes: {from: 0, to: v.state.doc.length, insert: arguments[1]}});",
            editor, text)
    _wait(driver, step, shown_json, timeout_s, f"the JSON of field {path!r} to read {text}")


def _wait_quiet(condition: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):
            result = condition()
            if result:
                return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_S)


def _set_scalar(driver, container, value: Any, path: str, timeout_s: float, json_fallback=None) -> None:
    """Set the one control inside container (a field's fieldset or a list item row)."""
    step = f"prefect-field-{path}"
    switch = _first_visible(driver, ".//button[@role='switch']", container)
    select = _first_visible(driver, ".//button[@aria-haspopup='listbox']", container)
    number = _first_visible(driver, ".//input[@type='number']", container)
    text = _first_visible(driver, ".//textarea | .//input[not(@type) or @type='text']", container)

    if isinstance(value, bool) and switch is not None:
        if (switch.get_attribute("aria-checked") == "true") != value:
            _click(driver, switch)
        _wait(driver, step, lambda: (switch.get_attribute("aria-checked") == "true") == value,
              timeout_s, f"the switch {path!r} to be {value}")
    elif select is not None and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        option_text = str(value)
        if " ".join(select.text.split()) != option_text:
            _click(driver, select)
            option = _wait(driver, step, lambda: _first_visible(
                driver, f"//*[@role='option'][normalize-space(.)={_xpath_literal(option_text)}]"),
                timeout_s, f"the option {option_text!r} of {path!r}")
            _click(driver, option)
        _wait(driver, step, lambda: " ".join(select.text.split()) == option_text, timeout_s,
              f"the select {path!r} to show {option_text!r}")
    elif number is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        _type_into(driver, number, repr(value) if isinstance(value, float) else str(value))
        _wait(driver, step, lambda: _same_number(_value_of(number), value), timeout_s,
              f"the number box {path!r} to read {value}")
    elif text is not None and isinstance(value, str):
        _type_into(driver, text, value)
        _wait(driver, step, lambda: _value_of(text) == value, timeout_s,
              f"the text box {path!r} to read {value!r}")
    elif json_fallback is not None:
        json_fallback()
    else:
        raise _fail(driver, step, f"do not know how to enter {value!r} for {path!r} in this control")


def _set_list(driver, block, values: list, path: str, timeout_s: float) -> None:
    """Delete the list's items (each item's menu -> Delete), then Add item + fill, per value."""
    step = f"prefect-field-{path}"
    item_menus = "./fieldset//button[@aria-haspopup='menu']"
    for _ in range(200):
        menus = _visible(driver, item_menus, block)
        if not menus:
            break
        count = len(menus)
        _click(driver, menus[0])
        _click(driver, _wait(driver, step, lambda: _first_visible(
            driver, "//*[@role='menuitem'][normalize-space(.)='Delete']"), timeout_s,
            f"the menu item 'Delete' of an item of {path!r}"))
        _wait(driver, step, lambda count=count: len(_visible(driver, item_menus, block)) < count, timeout_s,
              f"an item of {path!r} to be deleted")
    add = "./fieldset//button[normalize-space(.)='Add item']"
    for index, value in enumerate(values):
        _click(driver, _wait(driver, step, lambda: _first_visible(driver, add, block), timeout_s,
                             f"the 'Add item' button of {path!r}"))
        _wait(driver, step, lambda index=index: len(_visible(driver, item_menus, block)) == index + 1, timeout_s,
              f"item {index + 1} of {path!r} to appear")
        row = _visible(driver, item_menus, block)[index].find_element("xpath", "./..")
        _set_scalar(driver, row, value, f"{path}[{index}]", timeout_s)


_UNION_TABS = (  # Python type of the value -> names the form's type tabs use for it
    (type(None), ("none", "null")),
    (bool, ("bool", "boolean")),
    (int, ("int", "integer", "number")),
    (float, ("float", "number")),
    (str, ("str", "string")),
)


def _union_tab(driver, fieldset, value: Any):
    """For a union field (tabs to pick the type, e.g. `str | None`): the tab for value's type."""
    tablists = [tablist for tablist in _visible(driver, ".//*[@role='tablist']", fieldset)
                if tablist.find_element("xpath", "./ancestor::fieldset[1]") == fieldset]
    if not tablists:
        return None
    names = next((names for kind, names in _UNION_TABS if type(value) is kind), ())
    for tab in tablists[0].find_elements("xpath", ".//*[@role='tab']"):
        if _norm(tab.text) in names:
            return tab
    return False  # a union, but no tab for this type: use JSON


def _set_field(driver, scope, key: str, value: Any, timeout_s: float, titles: Mapping[str, set[str]],
               prefix: str = "") -> None:
    """Set one (possibly dotted or nested) field; scope is the form or a parent's fieldset."""
    first, _, rest = key.partition(".")
    path = f"{prefix}{first}"
    step = f"prefect-field-{path}"
    block = _find_block(driver, scope, first, path, step, titles)
    if rest:
        _set_field(driver, _fieldset(block), rest, value, timeout_s, titles, prefix=f"{path}.")
        return
    block.location_once_scrolled_into_view  # noqa: B018 - scrolls the field into view
    fieldset = _fieldset(block)
    json_editor = _first_visible(driver, "./fieldset//*[@contenteditable='true']", block)

    def as_json():
        _set_json(driver, block, value.value if isinstance(value, JsonInput) else value, path, timeout_s)

    tab = None if isinstance(value, JsonInput) or json_editor is not None else _union_tab(driver, fieldset, value)
    if isinstance(value, JsonInput) or json_editor is not None or tab is False:
        as_json()
    elif tab is not None:
        if tab.get_attribute("aria-selected") != "true":
            _click(driver, tab)
        _wait(driver, step, lambda: tab.get_attribute("aria-selected") == "true", timeout_s,
              f"the type tab {tab.text!r} of {path!r}")
        if value is not None:
            panel = _wait(driver, step, lambda: _first_visible(
                driver, f".//*[@role='tabpanel'][@aria-labelledby={_xpath_literal(tab.get_attribute('id'))}]",
                fieldset), timeout_s, f"the {tab.text!r} input of {path!r}")
            _set_scalar(driver, panel, value, path, timeout_s, json_fallback=as_json)
    elif isinstance(value, Mapping) and _nested_labels(fieldset):
        for sub_key, sub_value in value.items():
            _set_field(driver, fieldset, sub_key, sub_value, timeout_s, titles, prefix=f"{path}.")
    elif _first_visible(driver, "./fieldset//button[normalize-space(.)='Add item']", block) is not None:
        if isinstance(value, (list, tuple)) and all(
                isinstance(item, (str, int, float, bool)) for item in value):
            _set_list(driver, block, list(value), path, timeout_s)
        else:
            as_json()
    elif isinstance(value, (str, int, float, bool)) and not _nested_labels(fieldset):
        _set_scalar(driver, fieldset, value, path, timeout_s, json_fallback=as_json)
    else:
        as_json()


def _invalid_inputs(driver) -> list[str]:
    """Fields the browser's own validation refuses (min/max/step), with its message."""
    return driver.execute_script("""
        const out = [];
        for (const el of document.querySelectorAll('form input, form textarea, form select')) {
            if (el.willValidate && !el.checkValidity()) {
                const label = el.id && document.querySelector('label[for="' + el.id + '"]');
                out.push((label ? label.innerText : (el.name || el.tagName)) + ': ' + el.validationMessage);
            }
        }
        return out;""")


@_on_browser_error("prefect-run-deployment")
def run_deployment_from_ui(driver, ui_url: str, flow_name: str, deployment_name: str,
                           fields: Mapping[str, Any], timeout_s: float = 60, *,
                           run_name: str | None = None, submit_attempts: int = 3) -> str:
    """Start a custom run of flow_name/deployment_name from the Prefect UI; return its run URL.

    Opens <ui_url>/v2/deployments, searches for the deployment, opens it, clicks Run -> Custom
    run, gives the run a unique name (or run_name), fills `fields` into the parameter form
    (see the module docstring), checks every value reads back, clicks Submit and waits for the
    link to the new flow run. timeout_s bounds each step. The run id is the URL's last part.
    A 503 from the API while creating the run (Prefect's answer to a busy SQLite database)
    is retried up to submit_attempts times; any other refusal fails at once.
    """
    base = _prefect_base(ui_url)
    started = time.monotonic()
    api_url = _check_prefect_ui_settings(driver, base)
    titles = _field_titles(api_url, flow_name, deployment_name)
    _open_deployment(driver, base, flow_name, deployment_name, timeout_s)
    log.info("prefect ui: deployment %s/%s open after %.1fs", flow_name, deployment_name,
             time.monotonic() - started)
    _open_custom_run(driver, timeout_s)
    log.info("prefect ui: custom run form after %.1fs", time.monotonic() - started)
    form = driver.find_element("xpath", "//form")

    run_name = run_name or f"e2e-{uuid.uuid4().hex[:10]}"
    name_box = driver.find_element("xpath", "//form//input[@name='name']")
    _type_into(driver, name_box, run_name)
    _wait(driver, "prefect-run-name", lambda: _value_of(name_box) == run_name, timeout_s,
          f"the run name to read {run_name!r}")

    for key, value in fields.items():
        _set_field(driver, form, key, value, timeout_s, titles)

    log.info("prefect ui: %d fields filled after %.1fs", len(fields), time.monotonic() - started)
    invalid = _invalid_inputs(driver)
    if invalid:
        raise _fail(driver, "prefect-form-invalid", "the form refuses the values: " + "; ".join(invalid))

    name = _xpath_literal(run_name)
    run_link = (f"//a[contains(@href, '/runs/flow-run/')][normalize-space(.)={name}]"
                f" | //*[@data-sonner-toast][contains(., {name})]//a[contains(@href, '/runs/flow-run/')]")
    old_toasts: set[str] = set()

    def outcome():
        link = _first_visible(driver, run_link)
        if link is not None:
            return link.get_attribute("href")
        errors = [toast for toast in _visible(driver, "//*[@data-sonner-toast][@data-type='error']")
                  if toast.id not in old_toasts]
        if errors:
            return errors
        invalid_now = _invalid_inputs(driver)
        if invalid_now:
            raise _fail(driver, "prefect-submit", "the form refuses the values: " + "; ".join(invalid_now))
        return None

    console_seen = len(_console(driver))
    for attempt in range(1, submit_attempts + 1):
        _click(driver, driver.find_element(
            "xpath", "//form//button[@type='submit'][normalize-space(.)='Submit']"))
        result = _wait(driver, "prefect-submit", outcome, timeout_s, f"the new flow run {run_name!r} to appear")
        if isinstance(result, str):
            href = result
            break
        texts = [" ".join(toast.text.split()) for toast in result]
        console = _console(driver)[console_seen:]
        console_seen += len(console)
        # SQLite busy under load: the API answers 503 ("retry"), the UI shows an unknown error
        # and nothing was created. Submit again; any other refusal fails at once.
        busy = any("create_flow_run" in line and "status of 503" in line for line in console)
        if not busy or attempt == submit_attempts:
            raise _fail(driver, "prefect-submit", f"the UI refused the run (attempt {attempt}): "
                        + " | ".join(texts) + ("" if not console else "; console: " + " | ".join(console)[-600:]))
        log.warning("prefect ui: creating the flow run got 503 (database busy), submitting again: %s", texts)
        old_toasts.update(toast.id for toast in result)
        time.sleep(2 * attempt)
    run_url = urllib.parse.urljoin(base + "/", href)
    log.info("prefect ui: flow run %s created after %.1fs: %s", run_name, time.monotonic() - started, run_url)
    return run_url


def flow_run_id(run_url: str) -> str:
    """The flow run id at the end of a flow run URL."""
    return urllib.parse.urlsplit(run_url).path.rstrip("/").rsplit("/", 1)[-1]


def _run_state(driver) -> str | None:
    """The state badge under the flow run page's breadcrumb (Scheduled, Running, Completed...)."""
    badge = _first_visible(driver, "(//main//nav[@aria-label='breadcrumb']/following::*[@data-slot='badge'])[1]")
    if badge is None:
        badge = _first_visible(driver, "(//main//*[@data-slot='badge'])[1]")
    return " ".join(badge.text.split()) if badge is not None else None


@_on_browser_error("prefect-run-state")
def wait_for_run_state(driver, run_url: str, state: str = "Completed", timeout_s: float = 120, *,
                       bad_states: tuple[str, ...] = PREFECT_BAD_STATES, reload_every_s: float = 30) -> float:
    """Wait until the flow run page shows `state`; return the seconds waited.

    Fails at once if the page shows one of bad_states (other than `state`), and after
    timeout_s with the last state seen. The page polls the API itself; it is reloaded every
    reload_every_s in case that polling stalls.
    """
    from selenium.common.exceptions import StaleElementReferenceException

    step = f"prefect-run-state-{state}"
    start = time.monotonic()
    if driver.current_url.rstrip("/") != run_url.rstrip("/"):
        driver.get(run_url)
    last_load, seen = time.monotonic(), []
    while True:
        try:
            shown = _run_state(driver)
        except StaleElementReferenceException:
            shown = None
        if shown and (not seen or seen[-1] != shown):
            seen.append(shown)
        if shown == state:
            return time.monotonic() - start
        if shown in bad_states and shown != state:
            # Reload so the run's logs (shown below the header) are in the screenshot.
            driver.refresh()
            _wait_quiet(lambda: _run_state(driver) and "did not produce any logs"
                        not in driver.find_element("xpath", "//main").text, 8)
            errors = _wait_quiet(lambda: [line.strip() for line in driver.find_element("xpath", "//main").text
                                          .splitlines() if re.search(r"error|exception", line, re.I)], 0) or []
            raise _fail(driver, step, f"the flow run is {shown} (states seen: {' -> '.join(seen)}); "
                        "its logs are in the screenshot / page source and the serving process's output"
                        + "".join(f"\n  page shows: {line[:300]}" for line in errors[:6]))
        now = time.monotonic()
        if now - start > timeout_s:
            raise _fail(driver, step, f"timed out after {timeout_s:.0f}s waiting for state {state!r}; "
                        f"states seen: {' -> '.join(seen) or 'none (no state badge found)'}")
        if now - last_load > reload_every_s:
            driver.refresh()
            last_load = now
        time.sleep(0.5)


# --------------------------------------------------------------------------- MLflow


def _mlflow_aliases_shown(driver, model_name: str) -> dict[str, str] | None:
    """{alias: version} from the version rows of the model page, or None before they load."""
    versions_href = f"/models/{urllib.parse.quote(model_name, safe='')}/versions/"
    rows = driver.find_elements(
        "xpath", f"//*[@role='row'][.//a[contains(@href, {_xpath_literal(versions_href)})]]")
    if not rows:
        return None
    aliases = {}
    for row in rows:
        link = row.find_element("xpath", f".//a[contains(@href, {_xpath_literal(versions_href)})]")
        version = link.get_attribute("href").rstrip("/").rsplit("/", 1)[-1]
        for tag in row.find_elements("xpath", ".//*[@title]"):
            title = tag.get_attribute("title")
            text = " ".join(tag.text.replace("\xa0", " ").split())
            if title and text in (f"@ {title}", f"@{title}"):
                aliases[title] = version
    return aliases


@_on_browser_error("mlflow-model-aliases")
def mlflow_ui_model_aliases(driver, mlflow_url: str, model_name: str, timeout_s: float = 60, *,
                            expect: Mapping[str, str] | set[str] | None = None) -> dict[str, str]:
    """The aliases the MLflow UI shows on the registered model's page, as {alias: version}.

    Opens <mlflow_url>/#/models/<model_name> and reads the "@ alias" tags of the version rows.
    With expect (alias names, or {alias: version}), waits until the page shows them all
    (reloading every 10 s, since the page does not poll) and fails with a screenshot if it
    does not within timeout_s; without it, returns once the version rows have loaded and two
    reads agree. Only the first page of versions (25 rows, newest first) is read.
    """
    step = f"mlflow-model-aliases-{model_name}"
    base = mlflow_url.rstrip("/")
    driver.get(f"{base}/#/models/{urllib.parse.quote(model_name, safe='')}")
    _wait(driver, step, lambda: _first_visible(
        driver, f"//h1[normalize-space(.)={_xpath_literal(model_name)}]"
                f" | //h2[normalize-space(.)={_xpath_literal(model_name)}]"),
        timeout_s, f"the page of registered model {model_name!r}")

    if expect is not None:
        wanted = dict(expect) if isinstance(expect, Mapping) else {alias: None for alias in expect}
        loaded = [time.monotonic()]

        def shows_expected():
            if time.monotonic() - loaded[0] > 10:  # the page does not poll: reload to see new aliases
                driver.refresh()
                loaded[0] = time.monotonic()
            shown = _mlflow_aliases_shown(driver, model_name)
            if shown is None:
                return None
            ok = all(alias in shown and (version is None or str(version) == shown[alias])
                     for alias, version in wanted.items())
            return (shown,) if ok else None

        try:
            return _wait(driver, step, shows_expected, timeout_s, f"aliases {wanted} of {model_name!r}")[0]
        except BrowserStepError as exc:
            shown = _wait_quiet(lambda: _mlflow_aliases_shown(driver, model_name), 0)
            raise BrowserStepError(f"{exc}\n  aliases shown: {shown}") from None

    previous: list[dict[str, str] | None] = [None]

    def stable():
        shown = _mlflow_aliases_shown(driver, model_name)
        if shown is None:
            return None
        if shown == previous[0]:
            return (shown,)
        previous[0] = shown
        return None

    return _wait(driver, step, stable, timeout_s, f"the version rows of {model_name!r}", poll_s=0.5)[0]
