"""The operator's console in a real browser: headless Chromium (Debian's package, driven by
Playwright) against a real ``cmr serve`` on loopback, with API keys on.

One server, one test walking every view as an operator would: a wrong key is refused; the admin
logs in, sees a decision appear after a routed request (prompt shown), sees usage, the learner and
the hub, registers a model through the form and routes to it, retires it, moves λ and sees the
predicted point move on the curve, applies it; a key without the admin scope sees only its
tenant's decisions, no prompt, no admin form, and is refused admin actions. ``--console-shots DIR``
saves a screenshot of each view (docs/console/ in the README).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.ray.serve_process import cmr_serve, free_port

pytestmark = pytest.mark.ray

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pw = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install -e '.[test]')")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)", allow_module_level=True)


def _keys(home: Path) -> tuple[str, str]:
    """An admin key (tenant ops) and an infer+feedback key (tenant team2), made before the server starts."""
    from cmr.state import private_dir
    from services.auth import keys_path, open_key_store

    state = private_dir(home / "serve")
    store = open_key_store(None, keys_path(state))
    try:
        _, admin = store.create("ops", ("infer", "feedback", "admin"), note="console test admin")
        _, user = store.create("team2", ("infer", "feedback"), note="console test user")
    finally:
        store.close()
    return admin, user


def _eventually(check, timeout: float = 30.0, every: float = 0.3):
    end = time.monotonic() + timeout
    while True:
        try:
            out = check()
        except AssertionError:
            if time.monotonic() > end:
                raise
        else:
            if out is not False:
                return out
            if time.monotonic() > end:
                raise AssertionError("condition not met in time")
        time.sleep(every)


def _applied(home: Path):
    """The calibration applied in the served app's state store (SQLite here)."""
    from cmr.calibrate import applied
    from cmr.published import open_published_store

    store = open_published_store(None, home / "serve" / "published.sqlite")
    try:
        return applied(store)
    finally:
        store.close()


def test_console_in_a_browser(tmp_path, request):
    shots = request.config.getoption("--console-shots")
    shots = Path(shots) if shots else tmp_path / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    admin_key, user_key = _keys(tmp_path)
    port = free_port()
    args = ["--grpc-port", "0", "--home", str(tmp_path), "--train-limit", "20", "--no-tiny-models", "--num-cpus", "2"]
    with cmr_serve(args, port, stop_timeout_s=90), pw.sync_playwright() as p, \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
        base = f"http://127.0.0.1:{port}"
        as_admin = {"Authorization": f"Bearer {admin_key}"}
        as_user = {"Authorization": f"Bearer {user_key}"}
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        # the page is public, its data is not: a wrong key is refused and nothing is shown
        page.goto(f"{base}/console")
        assert page.url.endswith("/console/")
        page.fill("#key", "cmr-000000000000.wrongwrongwrongwrongwrong")
        page.click("#login-form button")
        pw.expect(page.locator("#login-error")).to_contain_text("refused")
        assert page.locator("#tabs").is_hidden() and page.locator("#view-decisions").is_hidden()
        page.screenshot(path=str(shots / "login.png"))

        # the admin logs in; a routed request's decision appears, with its prompt
        page.fill("#key", admin_key)
        page.click("#login-form button")
        pw.expect(page.locator("#who")).to_contain_text("tenant ops")
        r = http.post("/v1/route", json={"query": "console check: integrate x squared from 0 to 3"}, headers=as_admin)
        assert r.status_code == 200, r.text
        rid, model = r.json()["request_id"], r.json()["model"]
        row = page.locator(f'#decisions tr[data-request-id="{rid}"]')
        pw.expect(row).to_be_visible(timeout=20_000)
        pw.expect(row).to_contain_text(model)
        pw.expect(row.locator("td.prompt")).to_have_text("console check: integrate x squared from 0 to 3")
        assert http.post("/v1/feedback", json={"request_id": rid, "reward": 0.75}, headers=as_admin).status_code == 200
        pw.expect(row.locator("td").nth(7)).to_have_text("0.75", timeout=10_000)  # the reward column, on the next poll
        for q in ["write a haiku about routers", "what is the capital of Peru", "fix this python KeyError", "translate hello to French"]:
            assert http.post("/v1/route", json={"query": q}, headers=as_admin).status_code == 200
        pw.expect(page.locator("#decisions tbody tr")).to_have_count(5, timeout=20_000)
        page.screenshot(path=str(shots / "decisions.png"))

        # usage: per-model decisions over time, the rewarded one counted
        page.click('#tabs button[data-view="usage"]')
        pw.expect(page.locator("#usage tbody tr").first).to_be_visible()
        page.select_option("#u-window", "900")
        pw.expect(page.locator("#usage tbody tr").first).to_be_visible()
        assert page.evaluate("() => window.cmrCharts['u-share'].data.length") >= 2
        pw.expect(page.locator("#usage")).to_contain_text(model)
        page.screenshot(path=str(shots / "usage.png"))

        # learner: the router's checkpoint, the learner's lag, version and errors
        page.click('#tabs button[data-view="learner"]')
        # the feedback above is learnt soon: v2 (or later) once the learner has stepped
        pw.expect(page.locator('dd[data-fact="learner checkpoint"]')).to_have_text(re.compile(r"^v[2-9]"), timeout=60_000)
        pw.expect(page.locator('dd[data-fact="router checkpoint"]')).to_have_text(re.compile(r"^v[2-9]\d* written \d"), timeout=30_000)
        pw.expect(page.locator('dd[data-fact="lag (events waiting)"]')).to_have_text("0", timeout=15_000)
        pw.expect(page.locator('dd[data-fact="feedback stored (offset)"]')).to_have_text("1", timeout=15_000)
        page.screenshot(path=str(shots / "learner.png"))

        # hub: register through the form, find it, open it, route to it; then retire it
        page.click('#tabs button[data-view="hub"]')
        pw.expect(page.locator("#hub tbody tr").first).to_be_visible()
        form = page.locator("#register")
        form.locator('[name="id"]').fill("console-test-model")
        form.locator('[name="family"]').fill("console")
        form.locator('[name="domain"]').fill("console-domain")
        form.locator('[name="cost"]').fill("0.0005")
        form.locator('[name="description"]').fill("a model registered from the console test")
        form.locator('button[type="submit"]').click()
        pw.expect(page.locator("#register-result")).to_contain_text("registered console-test-model")
        page.fill("#h-search", "console-test")
        pw.expect(page.locator("#hub tbody tr")).to_have_count(1)
        page.click('#hub tr[data-model="console-test-model"]')
        pw.expect(page.locator("#card")).to_contain_text("console-domain")
        page.screenshot(path=str(shots / "hub.png"))
        r = http.post("/v1/route", json={"query": "anything", "routing": {"domains": ["console-domain"]}}, headers=as_admin)
        assert r.status_code == 200 and r.json()["model"] == "console-test-model", r.text
        page.click("#retire")
        pw.expect(page.locator("#card")).to_contain_text("console-test-model retired")
        r = http.post("/v1/route", json={"query": "anything", "routing": {"domains": ["console-domain"]}}, headers=as_admin)
        assert r.status_code == 400, r.text

        # bad input: a 400 naming the field, nothing applied
        for path, field in [("/v1/console/decisions?limit=0", "limit"), ("/v1/console/usage?window_s=nan", "window_s"),
                            ("/v1/console/whatif?cost_weight=-1", "cost_weight")]:
            r = http.get(path, headers=as_admin)
            assert r.status_code == 400 and f"'{field}'" in r.json()["error"]["message"], (path, r.text)
        for body in [{}, {"cost_weight": -1}, {"cost_weight": 1, "budget_per_1k": 2}, {"cost_weight": "x"}, {"cost_weight": 1, "extra": 1}]:
            r = http.post("/v1/admin/calibration", json=body, headers=as_admin)
            assert r.status_code == 400 and "field '" in r.json()["error"]["message"], (body, r.text)
        assert _applied(tmp_path) is None

        # what-if: the predicted point moves along the curve with λ; applying sets the router's λ.
        # CMRBench's cards all cost 0: a priced model that answered every profile prompt well gives
        # λ something to trade
        prompts = http.get("/v1/admin/profile", headers=as_admin).json()["prompts"]
        premium = {"id": "whatif-premium", "cost": 1.0, "description": "a strong, expensive generalist",
                   "profile": {q["id"]: 1.0 for q in prompts}}
        assert http.post("/v1/admin/models", json=premium, headers=as_admin).status_code == 201
        page.click('#tabs button[data-view="whatif"]')
        summary = page.locator("#w-summary")
        pw.expect(summary).to_contain_text("recent queries")
        page.fill("#w-lambda", "0")
        page.dispatch_event("#w-lambda", "change")
        pw.expect(summary).to_contain_text("At λ 0:")
        at0 = float(summary.get_attribute("data-cost"))
        x0 = page.evaluate("() => { const u = window.cmrCharts['w-curve']; return u.data[0][u.data[3].findIndex(v => v !== null)]; }")
        assert x0 == pytest.approx(at0)
        page.fill("#w-lambda", "1000")
        page.dispatch_event("#w-lambda", "change")
        pw.expect(summary).to_contain_text("At λ 1000:")
        at_big = float(summary.get_attribute("data-cost"))
        x1 = page.evaluate("() => { const u = window.cmrCharts['w-curve']; return u.data[0][u.data[3].findIndex(v => v !== null)]; }")
        assert at0 > 0 and at_big < at0 and x1 == pytest.approx(at_big), (at0, at_big, x1)
        page.screenshot(path=str(shots / "whatif.png"))
        page.click("#w-apply")
        pw.expect(summary).to_contain_text("applied λ = 1000")
        assert http.get("/healthz").json()["cost_weight"] == 1000 and _applied(tmp_path).cost_weight == 1000
        r = http.post("/v1/route", json={"query": "after the new lambda"}, headers=as_admin)
        assert r.json()["cost_weight"] == 1000

        # a key without the admin scope: its own tenant's decisions only, no prompt, no admin action
        user = browser.new_page(viewport={"width": 1280, "height": 860})
        user.on("pageerror", lambda e: errors.append(str(e)))
        user.goto(f"{base}/console/")
        user.fill("#key", user_key)
        user.click("#login-form button")
        pw.expect(user.locator("#who")).to_contain_text("tenant team2")
        r = http.post("/v1/route", json={"query": "a team2 secret prompt"}, headers=as_user)
        rid2 = r.json()["request_id"]
        pw.expect(user.locator(f'#decisions tr[data-request-id="{rid2}"]')).to_be_visible(timeout=20_000)
        assert user.locator("#decisions tbody tr").count() == 1  # the admin tenant's decisions are not shown
        assert user.locator("td.prompt").count() == 0 and "team2 secret" not in user.content()
        user.click('#tabs button[data-view="hub"]')
        assert user.locator("#register").is_hidden()
        user.click('#tabs button[data-view="whatif"]')
        assert user.locator("#w-apply").is_hidden()
        got = http.get("/v1/console/decisions", headers=as_user).json()["decisions"]
        assert [d["request_id"] for d in got] == [rid2] and "query" not in got[0]
        assert http.get("/v1/console/decisions?tenant=ops", headers=as_user).json()["decisions"] == [d for d in got]
        assert http.post("/v1/admin/calibration", json={"cost_weight": 0}, headers=as_user).status_code == 403
        assert http.post("/v1/admin/models", json={"id": "x"}, headers=as_user).status_code == 403
        assert http.get("/v1/console/status").status_code == 401
        assert http.get("/v1/console/decisions", headers={"Authorization": "Bearer cmr-000000000000.wrongwrongwrongwrongwrong"}).status_code == 401
        assert http.get("/console/../v1/console/decisions").status_code in (401, 404)
        assert errors == [], errors
        browser.close()
