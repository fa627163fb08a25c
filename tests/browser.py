"""Drive the system's Chromium, headless, from sync pytest tests (Playwright, no download).

Playwright's Python wheel carries its own driver; it is pointed at the Chromium already on
the machine (Debian's ``/usr/bin/chromium``), so ``playwright install`` is never needed.

    from tests.browser import browser_page, skip_unless_browser

    def test_page(gateway_url):
        skip_unless_browser()
        with browser_page(viewport=(390, 844)) as page:
            page.goto(gateway_url)
            page.get_by_test_id("prompt").fill("Hello")
            ...
            assert not page.js_errors

A test module that opens many pages shares one browser with ``chromium()`` and passes it as
``browser_page(browser=...)``; each page still gets its own context (cookies, storage).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

#: Flags for a quiet, reproducible headless run (Playwright adds ``--headless`` and a fresh
#: temporary ``--user-data-dir`` itself; it refuses one in ``args``).
CHROMIUM_ARGS = [
    "--no-sandbox",  # root in containers and CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # small /dev/shm in containers
]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    """The Chromium to use: ``$DLLM_CHROMIUM``, else the first one on ``PATH``; None if absent."""
    explicit = os.environ.get("DLLM_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def skip_reason() -> str | None:
    """Why browser tests can't run here, or None when they can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if chromium_path() is None:
        return "no Chromium found (apt-get install chromium, or set DLLM_CHROMIUM)"
    return None


def skip_unless_browser() -> None:
    """``pytest.skip`` with a clear reason when there is no browser to drive."""
    import pytest

    reason = skip_reason()
    if reason:
        pytest.skip(reason)


@contextmanager
def chromium(*, extra_args: list[str] | None = None, slow_mo: float | None = None) -> Iterator[Browser]:
    """Launch headless Chromium; closed (and its temporary profile removed) on exit."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    if path is None:
        raise RuntimeError(skip_reason() or "no Chromium found")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=path,
            headless=True,
            args=CHROMIUM_ARGS + list(extra_args or []),
            slow_mo=slow_mo,
            timeout=30_000,
        )
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def browser_page(
    viewport: tuple[int, int] = (1280, 900),
    *,
    browser: Browser | None = None,
    timeout_ms: float = 10_000,
    **context_options: Any,
) -> Iterator[Page]:
    """A fresh page in its own browser context, with a default timeout of ``timeout_ms``.

    Uncaught exceptions in the page are collected in ``page.js_errors`` and console errors
    in ``page.console_errors`` (lists of strings). Chromium also logs failed HTTP requests
    (a 503, a refused connection) as console errors, so most tests assert on the first.
    ``context_options`` go to ``Browser.new_context`` (e.g. ``device_scale_factor=2``,
    ``is_mobile=True``, ``has_touch=True``).
    """
    if browser is None:
        with chromium() as own:
            with browser_page(viewport, browser=own, timeout_ms=timeout_ms, **context_options) as page:
                yield page
        return
    width, height = viewport
    context = browser.new_context(viewport={"width": width, "height": height}, **context_options)
    try:
        context.set_default_timeout(timeout_ms)
        page = context.new_page()
        js_errors: list[str] = []
        console_errors: list[str] = []
        page.js_errors = js_errors  # type: ignore[attr-defined]
        page.console_errors = console_errors  # type: ignore[attr-defined]
        page.on("pageerror", lambda exc: js_errors.append(str(exc)))
        page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
        yield page
    finally:
        context.close()
