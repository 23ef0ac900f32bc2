"""The approver's console in a real headless browser (Debian's Chromium through Selenium),
against a real control plane on uvicorn with real keys, on the embedded defaults.

The story of the issue: an approver of org A finds a version in the inbox, sees its metrics
against production, approves it; a trainer promotes it; the approver rolls it back; the
registry, the alias and the audit log show each step. An org-B key sees none of org A's
models, a trainer cannot approve their own version, forms without a CSRF token are refused.

Screenshots land in ``$FORGELINE_CONSOLE_SCREENSHOTS`` when set (the README's come from here).
"""

from __future__ import annotations

import html
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from forgeline.control import create_control_app
from registry import lineage
from registry.client import Registry, missing_model_message
from registry.decisions import decide
from registry.keys import KeyStore
from registry.policy import PolicyBook
from registry.promotion import promote
from serving.gateway.server import serve_in_background
from tests.support.backends import TRAINER, sqlite_backend, trained_version, unique_name

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
POLICIES = PolicyBook.model_validate(
    {"default": {"thresholds": {"accuracy": {"min": 0.8}}, "no_regression": ["accuracy"], "approvals": {"count": 1}}}
)


@dataclass
class Console:
    url: str
    registry: Registry
    model: str
    secrets: dict[str, str]


@pytest.fixture
def console(tmp_path: Path, migrated_mlflow_db: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Console]:
    for key, value in sqlite_backend(tmp_path / "home", migrated_mlflow_db).env.items():
        monkeypatch.setenv(key, value)
    registry = Registry()
    keys = KeyStore(registry.audit.url)
    secrets = {
        "ana": keys.create("ana", roles=("approver",), org="acme")[0],
        TRAINER: keys.create(TRAINER, roles=("trainer", "approver"), org="acme")[0],  # approves others' work
        "bea": keys.create("bea", roles=("approver", "trainer"), org="globex")[0],
    }
    name = unique_name("support")
    for accuracy in (0.84, 0.91):
        version = trained_version(registry, name, accuracy=accuracy)
        registry.set_tags(name, version.version, {lineage.ORG: "acme"})
        for step, loss in enumerate((2.4, 1.6, 1.1, 0.7), start=1):
            registry.client.log_metric(version.run_id, "loss", loss, step=step * 10)
    decide(registry, name, 1, actor="ana", roles=("approver",), decision="approve", comment="first release")
    promote(registry, name, 1, policy=POLICIES.for_model(name), actor=TRAINER, reason="first release")
    app = create_control_app(registry=registry, keys=keys, policies=POLICIES, supervise=False)
    url, stop = serve_in_background(app)
    try:
        yield Console(url, registry, name, secrets)
    finally:
        stop()
        registry.close()
        keys.dispose()


@pytest.fixture
def browser() -> Iterator[object]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1366,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _by():
    from selenium.webdriver.common.by import By

    return By


def find(driver, by: str, value: str):
    """The element once the page that a click or submit loads has it (navigation is async)."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 30).until(expected_conditions.presence_of_element_located((by, value)))


def login(driver, console: Console, who: str) -> None:
    by = _by()
    driver.delete_all_cookies()
    driver.get(console.url + "/console")
    assert "/console/login" in driver.current_url  # no session: sent to the login page
    driver.find_element(by.ID, "api_key").send_keys(console.secrets[who])
    driver.find_element(by.CSS_SELECTOR, "form button[type=submit]").click()
    assert f"{who} · org" in find(driver, by.CSS_SELECTOR, "header .who").text


def shoot(driver, name: str) -> None:
    folder = os.environ.get("FORGELINE_CONSOLE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def page_fits(driver) -> None:
    # Readable on a laptop without scrolling sideways.
    assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")


def test_approve_promote_roll_back_in_a_browser(console: Console, browser) -> None:
    by, name, driver = _by(), console.model, browser

    # The approver finds version 2 in the inbox, with why it waits.
    login(driver, console, "ana")
    inbox = driver.find_element(by.TAG_NAME, "table").text
    assert f"{name}@2" in inbox and "0 of 1 approval" in inbox and f"{name}@1" not in inbox
    page_fits(driver)
    shoot(driver, "inbox")
    driver.find_element(by.LINK_TEXT, f"{name}@2").click()

    # Its metrics beside the production holder's (version 1), a loss chart and the gates.
    metrics = find(driver, by.ID, "metrics").text
    assert "production (v1)" in metrics
    assert re.search(r"accuracy 0\.91 — 0\.84", metrics), metrics
    assert driver.find_elements(by.CSS_SELECTOR, "svg.chart polyline")
    page_fits(driver)
    shoot(driver, "version")

    # Approve: the confirmation says what changes, then the decision is recorded.
    driver.find_element(by.ID, "comment").send_keys("outputs reviewed on the held-out set")
    driver.find_element(by.CSS_SELECTOR, "#decide-form button[value=approve]").click()
    assert "recorded with your comment" in find(driver, by.ID, "change").text
    driver.find_element(by.ID, "confirm").click()
    assert "recorded: approve by ana" in find(driver, by.CSS_SELECTOR, ".notice").text
    decisions = console.registry.decisions(name, 2)
    assert [(d.approver, d.decision, d.comment) for d in decisions] == [("ana", "approve", "outputs reviewed on the held-out set")]

    # The trainer cannot approve their own version; they promote it.
    login(driver, console, TRAINER)
    driver.get(f"{console.url}/console/models/{name}/versions/2")
    assert not driver.find_elements(by.ID, "decide-form")
    assert "cannot approve it" in driver.page_source
    driver.find_element(by.ID, "reason").send_keys("better routing accuracy")
    driver.find_element(by.CSS_SELECTOR, "#promote-form button[value=promote]").click()
    change = find(driver, by.ID, "change").text
    assert f"{name}@production moves from version 1 to version 2; every gate passes" in change
    shoot(driver, "confirm-promote")
    driver.find_element(by.ID, "confirm").click()
    assert f"{name}@production is now version 2" in find(driver, by.CSS_SELECTOR, ".notice").text
    assert console.registry.aliases(name)["production"] == 2

    # The approver rolls it back from the model page.
    login(driver, console, "ana")
    driver.get(f"{console.url}/console/models/{name}")
    driver.find_element(by.ID, "reason-production").send_keys("complaints from the support desk")
    driver.find_element(by.CSS_SELECTOR, "button[name=rollback]").click()
    assert f"{name}@production moves back from version 2 to version 1" in find(driver, by.ID, "change").text
    driver.find_element(by.ID, "confirm").click()
    assert "rolled back to version 1" in find(driver, by.CSS_SELECTOR, ".notice").text
    assert console.registry.aliases(name)["production"] == 1

    # Every step is in the audit log, and the console's audit search finds it.
    moves = [(e.action, e.actor, e.from_version, e.to_version) for e in console.registry.alias_history(name, "production")]
    assert moves[-2:] == [("promote", TRAINER, 1, 2), ("rollback", "ana", 2, 1)]
    driver.get(f"{console.url}/console/audit?actor=ana")
    audit = driver.find_element(by.ID, "audit").text
    assert "rollback" in audit and "complaints from the support desk" in audit and "promote" not in audit
    driver.get(f"{console.url}/console/models/{name}/history")
    assert "better routing accuracy" in driver.page_source
    page_fits(driver)
    shoot(driver, "history")


def test_other_org_sees_nothing_and_keyboard_only_login(console: Console, browser) -> None:
    by, driver = _by(), browser
    from selenium.webdriver.common.keys import Keys

    driver.get(console.url + "/console/login")
    field = driver.find_element(by.ID, "api_key")
    assert driver.switch_to.active_element == field  # focus starts in the key field
    field.send_keys(console.secrets["bea"], Keys.ENTER)  # the keyboard alone logs in
    assert "bea · org globex" in find(driver, by.CSS_SELECTOR, "header .who").text
    assert console.model not in driver.page_source
    for path in (f"/console/models/{console.model}", f"/console/models/{console.model}/versions/2",
                 f"/console/models/{console.model}/history", f"/console/audit?model={console.model}"):
        driver.get(console.url + path)
        shown = driver.find_element(by.TAG_NAME, "main").text.replace(missing_model_message(console.model), "")
        assert "support-" not in shown, path


def _session(console: Console, who: str) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=console.url, follow_redirects=False, timeout=30)
    assert client.post("/console/login", data={"api_key": console.secrets[who]}).status_code == 303
    page = client.get(f"/console/models/{console.model}/versions/2")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf, page.text[:500]
    return client, csrf.group(1)


def test_forms_need_the_session_csrf_token_and_roles(console: Console) -> None:
    name = console.model
    decide_url = f"/console/models/{name}/versions/2/decide"
    ana, token = _session(console, "ana")
    for data in ({}, {"csrf": "forged"}, {"csrf": token[:-2] + "xx"}):
        refused = ana.post(decide_url, data={"decision": "approve", "comment": "c", **data})
        assert refused.status_code == 403 and "CSRF" in refused.text
    assert not console.registry.decisions(name, 2)

    # Another session's token is no good either.
    tess, tess_token = _session(console, TRAINER)
    assert ana.post(decide_url, data={"decision": "approve", "comment": "c", "csrf": tess_token}).status_code == 403

    # The trainer's own approval is refused even when posted by hand.
    own = tess.post(decide_url, data={"decision": "approve", "comment": "mine", "csrf": tess_token})
    assert own.status_code == 403 and "self-approval" in own.text
    assert not console.registry.decisions(name, 2)

    # Another org's session cannot act on the model: it does not exist for them.
    globex = httpx.Client(base_url=console.url, follow_redirects=False, timeout=30)
    globex.post("/console/login", data={"api_key": console.secrets["bea"]})
    home = globex.get("/console")
    globex_token = re.search(r'name="csrf" value="([^"]+)"', home.text).group(1)
    other = globex.post(decide_url, data={"decision": "approve", "comment": "c", "csrf": globex_token})
    assert other.status_code == 404 and name not in html.unescape(other.text).replace(missing_model_message(name), "")
    assert not console.registry.decisions(name, 2)

    # Cookies are HttpOnly and SameSite=Strict; logout ends the session.
    cookie = httpx.post(console.url + "/console/login", data={"api_key": console.secrets["ana"]}).headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert ana.post("/console/logout", data={"csrf": token}).status_code == 303
    assert ana.get("/console").status_code == 303  # back to the login page
    for client in (ana, tess, globex):
        client.close()


# What each console route does, stated here independently of the route table (operation:
# the registry.authz operation its page or action needs).
CONSOLE_ROUTES = {
    ("GET", "/console"): "read", ("GET", "/console/audit"): "read", ("GET", "/console/jobs"): "read",
    ("GET", "/console/jobs/{job_id}"): "read",
    ("GET", "/console/models/{name}"): "read", ("GET", "/console/models/{name}/history"): "read",
    ("GET", "/console/models/{name}/versions/{version}"): "read",
    ("POST", "/console/models/{name}/versions/{version}/confirm"): "decide",
    ("POST", "/console/models/{name}/versions/{version}/decide"): "decide",
    ("POST", "/console/models/{name}/versions/{version}/promote"): "promote",
    ("POST", "/console/models/{name}/aliases/{alias}/confirm-rollback"): "rollback",
    ("POST", "/console/models/{name}/aliases/{alias}/rollback"): "rollback",
    ("POST", "/console/jobs/{job_id}/{action}"): "train",
    ("POST", "/console/logout"): "session",
}
ROLES_OF = {"other_org": {"approver", "trainer"}, "pattern_miss": {"approver"}}  # as created below
SPEC_ROLES = {"read": {"trainer", "approver", "user"}, "decide": {"approver"}, "promote": {"trainer", "approver"},
              "rollback": {"approver"}, "train": {"trainer"}, "session": {"trainer", "approver", "user"}}


def test_console_session_matrix_from_the_route_table(console: Console) -> None:
    """Every console route of the app × every kind of session: nobody passes without a valid
    session, roles and model patterns decide as on the API, another org's model is 404."""
    from forgeline.control.auth import ROUTES
    from registry.authz import Operation
    from registry.keys import KeyStore

    declared = {route for route, rule in ROUTES.items() if rule.operation is Operation.CONSOLE}
    assert declared == set(CONSOLE_ROUTES), declared ^ set(CONSOLE_ROUTES)
    keys = KeyStore(console.registry.audit.url)
    secrets = {role: keys.create(f"matrix-{role}", roles=(role,), org="acme")[0] for role in ("trainer", "approver", "user")}
    secrets["other_org"] = console.secrets["bea"]
    secrets["pattern_miss"] = keys.create("matrix-scoped", roles=("approver",), org="acme", models="other-*")[0]
    revoked_secret, revoked = keys.create("matrix-revoked", roles=("approver",), org="acme")

    def session(secret: str | None) -> tuple[httpx.Client, str]:
        client = httpx.Client(base_url=console.url, follow_redirects=False, timeout=30)
        if secret is None:
            return client, "no-session"
        assert client.post("/console/login", data={"api_key": secret}).status_code == 303
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/console").text)
        return client, token.group(1) if token else ""

    sessions = {who: session(secret) for who, secret in secrets.items()}
    sessions["none"] = session(None)
    forged = httpx.Client(base_url=console.url, follow_redirects=False, timeout=30)
    forged.cookies.set("forgeline_console", "eyJraWQiOiJ4In0.AAAA", path="/console")
    sessions["forged"] = (forged, "x")
    sessions["revoked"] = session(revoked_secret)
    keys.revoke(revoked.id)  # its session ends with it
    cells = leaks = 0
    for (method, path), operation in CONSOLE_ROUTES.items():
        if path == "/console/logout":
            continue  # ends the session: checked in test_forms_need_the_session_csrf_token_and_roles
        url = path.format(name=console.model, version=2, alias="production", job_id="ftjob-none", action="cancel")
        for who, (client, token) in sessions.items():
            data = {"csrf": token, "action": "approve", "decision": "approve", "comment": "matrix",
                    "alias": "staging", "reason": "matrix"}
            response = client.request(method, url, data=data if method == "POST" else None)
            status, where = response.status_code, f"{method} {path} as {who}"
            cells += 1
            if who in ("none", "forged", "revoked"):
                expected = 303 if method == "GET" else 401
                assert status == expected, (where, status)
                assert method == "POST" or "/console/login" in response.headers["location"], where
            elif who == "other_org" and "{name}" in path:
                assert status == 404, (where, status)
                leaks += console.model in html.unescape(response.text).replace(missing_model_message(console.model), "")
            elif who == "pattern_miss" and "{name}" in path:
                assert status == 403, (where, status)
            elif ROLES_OF.get(who, {who}) & SPEC_ROLES[operation]:
                assert status not in (401, 403), (where, status, response.text[-400:])
            else:
                assert status == 403, (where, status)
    # Whatever passed, nothing of org A reached another org, and no decision was recorded by
    # anyone who may not decide.
    assert leaks == 0
    deciders = {d.approver for d in console.registry.decisions(console.model, 2)}
    assert deciders <= {"matrix-approver"}, deciders
    assert console.registry.aliases(console.model).get("staging") in (None, 2)
    print(f"console session matrix: {cells} cells")
    for client, _ in sessions.values():
        client.close()
