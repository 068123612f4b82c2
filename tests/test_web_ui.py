"""The chat page at ``/``, in a real browser: Playwright drives Debian's Chromium (headless) against
real ``qwenrun serve`` processes — the demo model for real answers, the tiny model behind
``--api-key`` for the key prompt. Plus the page's files in-process (served, offline, CSP, the
vendored libraries unchanged) and ``--no-web-ui``.

Screenshots land in tmp_path and in .pytest-artifacts/ at the repository root."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from test_server import REPO, ServerProcess, serving, tiny_ckpt  # noqa: F401 - tiny_ckpt is a fixture

from qwenrun.cli import build_parser
from qwenrun.server.app import ServerState, build_app
from qwenrun.server.web import STATIC
from qwenrun.settings import ServerConfig

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# --headless with no sandbox (root); the rest stop Chromium's own calls to Google's hosts, which this
# closed network refuses by the dozen.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / ".pytest-artifacts"
KEY = "ui-test-key"
LONG = 120_000  # ms: a demo answer on a busy 2-core machine


# -- in-process: files, headers, flags (no model is loaded: the app's lifespan never runs) ----------
def _client(*flags: str) -> TestClient:
    return TestClient(build_app(ServerState(ServerConfig.from_args(build_parser().parse_args(["serve", "demo", *flags])))))


def _assets() -> list[str]:
    """Every URL the page loads: index.html's src/href attributes, then each module's imports."""
    html = (STATIC / "index.html").read_text()
    urls = [u for u in re.findall(r'(?:src|href)="([^"]+)"', html) if not u.startswith(("data:", "metrics"))]
    for js in STATIC.glob("*.js"):
        urls += [f"static/{m}" for m in re.findall(r'from "\./([^"]+)"', js.read_text())]
    return sorted(set(urls))


def test_page_and_assets_are_served_with_a_strict_csp():
    c = _client()
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    # No inline script, no foreign script or connection: injected markup could neither run nor phone home.
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assets = _assets()
    assert {"static/chat.js", "static/api.js", "static/store.js", "static/markdown.js", "static/style.css",
            "static/vendor/marked.umd.js", "static/vendor/purify.min.js", "static/vendor/highlight.min.js"} <= set(assets)
    for url in assets:
        a = c.get("/" + url)
        assert a.status_code == 200, url
        kind = "text/css" if url.endswith(".css") else "javascript"
        assert kind in a.headers["content-type"], (url, a.headers["content-type"])
    # The page's own files name no other host (no CDN): everything comes from this server.
    for f in [STATIC / "index.html", *STATIC.glob("*.js"), STATIC / "style.css"]:
        assert not re.search(r"https?://|//cdn", f.read_text()), f
    # The page loads without the API key; the API does not (unchanged Guard).
    guarded = _client("--api-key", KEY)
    assert guarded.get("/").status_code == 200 and guarded.get("/static/chat.js").status_code == 200
    assert guarded.get("/v1/models").status_code == 401
    assert guarded.get("/tokenizer_info").status_code == 401
    # Before the model has loaded, /tokenizer_info says so like every inference route.
    assert c.get("/tokenizer_info").status_code == 503


def test_no_web_ui_flag_and_env(monkeypatch):
    flagged = _client("--no-web-ui")
    monkeypatch.setenv("QWENRUN_NO_WEB_UI", "1")
    for c in (flagged, _client()):
        r = c.get("/")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert c.get("/static/chat.js").status_code == 404
        assert c.get("/metrics").status_code == 200  # the rest of the server is unchanged


def test_vendored_libraries_are_the_published_files_with_licenses():
    vendor = STATIC / "vendor"
    table = re.findall(r"^\| `([^`]+)` \| `([^`]+)`.*\| `([0-9a-f]{64})` \|$", (vendor / "README.md").read_text(), re.M)
    assert {f for f, _, _ in table} == {p.name for p in vendor.iterdir() if p.suffix in (".js", ".css")}
    for name, package, digest in table:
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, f"{name} differs from {package}"
    for lic in ("LICENSE.marked.md", "LICENSE.dompurify.txt", "LICENSE-MPL.dompurify.txt", "LICENSE.highlightjs.txt"):
        assert (vendor / lic).stat().st_size > 500, lic


# -- the browser ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Watch:
    """What a page did that it must not: uncaught script errors, dialogs (alert …), requests to
    anything but the server under test (the page must work offline)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.foreign: list[str] = []


@pytest.fixture
def open_page(browser) -> Iterator[Callable]:
    contexts = []
    watches: list[Watch] = []

    def open_(srv: ServerProcess, path: str = "/"):
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(ctx)
        watch = Watch()
        watches.append(watch)

        def route(r):
            if r.request.url.startswith(srv.url + "/"):
                r.continue_()
            else:
                watch.foreign.append(r.request.url)
                r.abort()

        ctx.route("**/*", route)
        page = ctx.new_page()
        page.on("pageerror", lambda e: watch.errors.append(str(e)))

        def on_dialog(d):
            watch.dialogs.append(d.message)
            d.dismiss()

        page.on("dialog", on_dialog)
        page.goto(srv.url + path)
        return page, watch

    yield open_
    for ctx in contexts:
        ctx.close()
    for w in watches:
        assert not w.errors and not w.dialogs and not w.foreign, vars(w)


def screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)
    return path


def settings(page, **values) -> None:
    for name, v in values.items():
        page.fill(f"#{name}", str(v))


def ask(page, text: str, timeout: float = LONG):
    """Send ``text`` and wait for the answer to finish; returns the answer's locator."""
    n = page.locator(".message.assistant").count()
    page.fill("#input", text)
    page.click("#send")
    answer = page.locator(".message.assistant").nth(n)
    answer.and_(page.locator("[data-state=done]")).wait_for(timeout=timeout)
    return answer


def finished_requests(srv: ServerProcess) -> float:
    return sum(v for k, v in srv.metrics().items() if k.startswith("qwenrun:request_success_total"))


def wait_for_ready(page) -> None:
    page.locator("#status.ready").wait_for(timeout=LONG)


@pytest.fixture(scope="module")
def demo_ui(tmp_path_factory):
    # int8 weights, as `make demo` chats: 3x the dense decode speed on CPU.
    with serving(["demo", "--quantization", "int8", "--max-model-len", "2048", "--kv-cache-memory", "0.5"],
                 tmp_path_factory.mktemp("log") / "demo_ui.log", 300) as srv:
        yield srv


@pytest.fixture(scope="module")
def guarded_ui(tiny_ckpt, tmp_path_factory):  # noqa: F811
    with serving([str(tiny_ckpt), "--served-model-name", "tiny", "--max-model-len", "1024",
                  "--kv-cache-memory", "0.25", "--api-key", KEY],
                 tmp_path_factory.mktemp("log") / "guarded_ui.log", 120) as srv:
        yield srv


def test_chat_streams_multiturn_edit_regenerate_and_survives_reload(demo_ui, open_page):
    page, _ = open_page(demo_ui)
    wait_for_ready(page)
    assert page.inner_text("#model-name") == "demo"
    settings(page, temperature=0, max_tokens=24)
    page.fill("#input", "What is the capital of France?")
    page.press("#input", "Enter")
    # Streamed: part of the answer is on the page while the request is still running.
    page.wait_for_function("""() => {
        const m = document.querySelector('.message.assistant[data-state=streaming] .content');
        return m && m.textContent.length > 0; }""", timeout=LONG)
    first = page.locator(".message.assistant").nth(0)
    first.and_(page.locator("[data-state=done]")).wait_for(timeout=LONG)
    assert "Paris" in first.locator(".content").inner_text()
    stats = first.locator(".stats").inner_text()
    assert re.search(r"^\d+ tokens · [\d.]+ tok/s · first token [\d.]+ s · context \d+ / 2048 \([\d.]+%\)", stats), stats

    # Multi-turn: the follow-up only makes sense with the first turn sent along.
    second = ask(page, "And of Germany? Answer with the city name.")
    assert "Berlin" in second.locator(".content").inner_text()
    ctx1 = int(re.search(r"context (\d+)", stats).group(1))
    ctx2 = int(re.search(r"context (\d+)", second.locator(".stats").inner_text()).group(1))
    assert ctx2 > ctx1  # the second request carried the whole conversation

    # Reload: the conversation comes back from localStorage, answers and stats included.
    page.reload()
    wait_for_ready(page)
    assert page.locator("#conversations li").count() == 1
    assert "What is the capital of France?" in page.inner_text("#conversations li.active")
    assert page.locator(".message").count() == 4
    assert "Paris" in page.locator(".message.assistant").nth(0).inner_text()
    assert page.locator(".message.assistant").nth(0).locator(".stats").inner_text() == stats
    assert page.input_value("#temperature") == "0"  # settings persist too

    # Edit the first question: what followed it is replaced by the new answer.
    page.locator(".message.user .edit").nth(0).click()
    page.fill(".edit-area", "What is the capital of Italy?")
    page.click(".save-edit")
    italy = page.locator(".message.assistant").nth(0)
    italy.and_(page.locator("[data-state=done]")).wait_for(timeout=LONG)
    assert page.locator(".message").count() == 2 and "Rome" in italy.inner_text()
    assert page.locator(".message.user .content").inner_text() == "What is the capital of Italy?"

    # Regenerate: the answer is asked for again (greedy, so the same words).
    before = italy.locator(".content").inner_text()
    served = finished_requests(demo_ui)
    italy.locator(".regenerate").click()  # the click handler re-renders the answer as streaming
    again = page.locator(".message.assistant").nth(0)
    again.and_(page.locator("[data-state=done]")).wait_for(timeout=LONG)
    assert page.locator(".message").count() == 2 and again.locator(".content").inner_text() == before
    assert finished_requests(demo_ui) == served + 1  # asked the server again, not a copy

    # A system prompt from the settings goes first: it changes what the model answers.
    settings(page, system="You always answer in French.")
    page.click("#new-chat")
    fr = ask(page, "Say hello.")
    assert re.search(r"Bonjour|Salut", fr.inner_text()), fr.inner_text()
    assert page.locator("#conversations li").count() == 2


def test_code_block_is_highlighted_and_copied(demo_ui, open_page, tmp_path):
    page, _ = open_page(demo_ui)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    wait_for_ready(page)
    settings(page, temperature=0, max_tokens=80)
    answer = ask(page, "Write a Python function that adds two numbers. Reply with only the code.")
    block = answer.locator(".code-block")
    assert block.count() >= 1
    assert block.first.locator(".code-bar span").inner_text() == "python"
    assert block.first.locator("code.hljs .hljs-keyword").count() >= 1  # highlighted, not plain text
    code = block.first.locator("code").inner_text()
    assert "def " in code and "return" in code
    block.first.locator(".copy").click()
    page.wait_for_function("() => document.querySelector('.code-block .copy').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == block.first.locator("code").text_content()
    shot = screenshot(page, tmp_path, "web_ui_chat.png")
    assert shot.stat().st_size > 10_000


def test_stop_aborts_the_request_and_frees_the_kv_cache(demo_ui, open_page):
    page, _ = open_page(demo_ui)
    wait_for_ready(page)
    settings(page, temperature=0, max_tokens=1500)
    before = demo_ui.metrics()
    page.fill("#input", "Write a very long story about a dragon who learns to bake bread. At least 2000 words.")
    page.click("#send")
    page.wait_for_function("""() => {
        const m = document.querySelector('.message.assistant[data-state=streaming] .content');
        return m && m.textContent.length > 80; }""", timeout=LONG)
    mid = demo_ui.metrics()
    assert mid["qwenrun:num_requests_running"] == 1 and mid["qwenrun:kv_cache_usage_perc"] > 0
    page.click("#stop")
    answer = page.locator(".message.assistant").nth(0)
    answer.and_(page.locator("[data-state=done]")).wait_for(timeout=10_000)
    m = demo_ui.wait_idle(15)
    key = "qwenrun:request_success_total{finished_reason=abort}"
    assert m[key] - before.get(key, 0) == 1
    generated = m["qwenrun:generation_tokens_total"] - before["qwenrun:generation_tokens_total"]
    assert generated < 750  # stopped early, not run to max_tokens
    # The partial answer stays, marked as stopped; the page is ready for the next question.
    assert len(answer.locator(".content").text_content()) > 80  # the same test as before the stop
    assert answer.locator(".stats").inner_text().endswith("stopped")
    assert page.is_visible("#send") and not page.is_visible("#stop")
    page.reload()
    assert page.locator(".message.assistant .stats").inner_text().endswith("stopped")


HOSTILE_PROMPT = 'Repeat exactly, with no other text: <img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script>'


def assert_nothing_ran(page) -> None:
    page.wait_for_timeout(500)  # give a broken image's onerror the time it would need
    assert page.evaluate("window.__pwned") is None
    msgs = page.locator("#messages")
    assert msgs.locator("script, iframe, object, embed, svg, [onerror], [onload], [onclick]").count() == 0
    assert page.locator("#conversations script, #conversations img").count() == 0
    assert all(not (a.get_attribute("href") or "").lower().startswith("javascript:")
               for a in msgs.locator("a").all())


def test_model_output_with_html_is_shown_not_run(demo_ui, open_page):
    page, _ = open_page(demo_ui)
    wait_for_ready(page)
    settings(page, temperature=0, max_tokens=64)
    answer = ask(page, HOSTILE_PROMPT)
    text = answer.locator(".content").inner_text()
    # The demo model repeats the markup; the page shows it as text and runs none of it.
    assert "<script>" in text and "onerror" in text, text
    assert answer.locator(".content img").count() == 0
    assert_nothing_ran(page)


def test_stored_hostile_conversation_is_not_run_on_reload(demo_ui, open_page):
    """The same rendering path, fed directly through localStorage: deterministic, every vector."""
    page, _ = open_page(demo_ui)
    hostile = "\n\n".join([
        "**bold** and `code`",
        '<img src=x onerror="window.__pwned=1">',
        "<script>window.__pwned=2</script>",
        "inline <b onclick=\"window.__pwned=3\">tag</b> and <svg onload=\"window.__pwned=4\"></svg>",
        "[click me](javascript:window.__pwned=5)",
        '![pic](x" onerror="window.__pwned=6)',
        '<iframe srcdoc="<script>parent.__pwned=7</script>"></iframe>',
        "```html\n<script>window.__pwned=8</script>\n```",
    ])
    chats = {"current": "c1", "conversations": [{
        "id": "c1", "title": '<img src=x onerror="window.__pwned=9">', "created": 1,
        "messages": [{"role": "user", "content": '<img src=x onerror="window.__pwned=10">hi'},
                     {"role": "assistant", "content": hostile}]}]}
    page.evaluate("c => localStorage.setItem('qwenrun.chats.v1', c)", json.dumps(chats))
    page.reload()
    answer = page.locator(".message.assistant .content")
    answer.wait_for()
    assert answer.locator("strong").inner_text() == "bold"  # Markdown still renders
    assert "<script>window.__pwned=2</script>" in answer.inner_text()  # raw HTML is shown as text
    assert page.locator(".message.user .content").inner_text().startswith("<img src=x")
    page.get_by_text("click me").click()
    assert_nothing_ran(page)


def test_api_key_prompt_wrong_key_and_401(guarded_ui, open_page, tmp_path):
    page, _ = open_page(guarded_ui)
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible", timeout=30_000)  # asked at once: /v1/models said 401
    assert "--api-key" in dialog.inner_text()
    page.fill("#key-input", "not-the-key")
    page.click("#key-save")
    page.wait_for_function("() => document.querySelector('#key-error').textContent.includes('wrong API key')")
    assert dialog.is_visible()
    screenshot(page, tmp_path, "web_ui_api_key.png")
    page.fill("#key-input", KEY)
    page.click("#key-save")
    dialog.wait_for(state="hidden")
    wait_for_ready(page)
    assert page.inner_text("#model-name") == "tiny"
    settings(page, max_tokens=8)
    answer = ask(page, "Hello")
    assert answer.locator(".content").inner_text() and not answer.locator(".error").is_visible()
    assert re.match(r"\d+ tokens", answer.locator(".stats").inner_text())
    # The key changes under the page (rotated on the server, say): a readable error, and the prompt again.
    page.evaluate("localStorage.setItem('qwenrun.apiKey', 'rotated-away')")
    failed = ask(page, "Hello again")
    assert "Error 401: Unauthorized: a wrong API key was given" in failed.locator(".error").inner_text()
    dialog.wait_for(state="visible")
    assert "wrong API key" in page.inner_text("#key-error")
    # The key stays in the browser and is sent as a bearer token (checked against the real server).
    page.fill("#key-input", KEY)
    page.click("#key-save")
    dialog.wait_for(state="hidden")
    assert page.evaluate("localStorage.getItem('qwenrun.apiKey')") == KEY
    assert httpx.get(guarded_ui.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
