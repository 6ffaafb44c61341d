"""End to end in a real browser (Debian's chromium driven by selenium, headless): an admin creates
a specialist and an uploader; the uploader uploads a bulk ZIP; a real worker scores it; the
specialist claims the top case, sees the image, toggles the heat map and records a decision;
the decision is in the audit export. Screenshots of each step go to test-artifacts/browser/."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pytest
import requests
from PIL import Image
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Prediction, Referral, Study
from dermascan.security.accounts import create_user
from dermascan.security.identity import get_or_create_program
from tests.ham_files import ham_zip
from tests.services import ROOT, wait_for

pytestmark = pytest.mark.browser


AXE = Path(os.environ.get("DERMASCAN_AXE_JS", ROOT / ".ci" / "node" / "node_modules" / "axe-core" / "axe.min.js"))
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]


def accessibility_violations(driver) -> list[dict]:
    """axe-core's WCAG 2.1 A/AA violations on the current page: rule, impact and the first
    elements it found (axe-core comes from the npm registry: .ci/run installs it)."""
    assert AXE.is_file(), f"{AXE} is missing: npm install --prefix .ci/node axe-core@4 (as .ci/run does)"
    driver.execute_script(AXE.read_text())
    driver.set_script_timeout(60)
    return driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        axe.run(document, {runOnly: {type: "tag", values: arguments[0]}}).then(function (r) {
          done(r.violations.map(function (v) {
            return {id: v.id, impact: v.impact, nodes: v.nodes.slice(0, 5).map(function (n) { return n.target.join(" "); })};
          }));
        });""",
        WCAG_TAGS,
    )


def _one_formatting_rule(driver) -> None:
    """Every page writes instants as YYYY-MM-DD HH:MM and ages as whole years: no ISO 'T' time
    and no 'N.0' age in what the page shows."""
    import re

    text = (
        driver.find_element(By.TAG_NAME, "main").text
        if driver.find_elements(By.TAG_NAME, "main")
        else driver.find_element(By.TAG_NAME, "body").text
    )
    assert not re.search(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}", text), text
    assert not re.search(r"(?<![\d.])\d{1,3}\.0(?![\d%.])(?! %)", text), text


class Steps:
    def __init__(self, driver, base, folder):
        self.d, self.base, self.folder, self.n = driver, base, folder, 0
        folder.mkdir(parents=True, exist_ok=True)

    def shot(self, name):
        """A screenshot of the page, and its accessibility check (axe-core, WCAG 2.1 A and AA)."""
        self.n += 1
        self.d.save_screenshot(str(self.folder / f"{self.n:02d}-{name}.png"))
        violations = accessibility_violations(self.d)
        assert not violations, f"{name} ({self.d.current_url}): {violations}"

    def go(self, path):
        self.d.get(self.base + path)

    def wait(self, by, value, timeout=30):
        return WebDriverWait(self.d, timeout).until(EC.presence_of_element_located((by, value)))

    def wait_text(self, by, value, text, timeout=30):
        """Until the element shows ``text`` — read again while a navigation replaces the page (the
        old page's element may be found first, then detached: Chrome then answers "Node with given
        id does not belong to the document")."""
        WebDriverWait(self.d, timeout, ignored_exceptions=[StaleElementReferenceException, WebDriverException]).until(
            lambda d: d.find_element(by, value).text == text
        )

    def follow(self, element, timeout=30):
        """Click a link or a submit button and wait until the browser has replaced the page: an
        element of the same id on the old page (a flash, the decision, a table) is otherwise found
        first and then goes stale under the test while the new page loads."""
        old = self.d.find_element(By.TAG_NAME, "html")
        element.click()

        def replaced(_):
            try:
                old.is_enabled()
            except StaleElementReferenceException:
                return True
            except WebDriverException as exc:  # Chrome's word for a node of a page being replaced
                if "does not belong to the document" in str(exc):
                    return True
                raise
            return False

        WebDriverWait(self.d, timeout).until(replaced)

    def login(self, username, password):
        self.go("/login")
        self.d.find_element(By.NAME, "username").send_keys(username)
        self.d.find_element(By.NAME, "password").send_keys(password)
        self.follow(self.d.find_element(By.ID, "login"))
        self.wait(By.ID, "logout")

    def logout(self):
        self.follow(self.d.find_element(By.ID, "logout"))
        self.wait(By.ID, "login-form")


def test_upload_score_claim_decide_audit(pg_settings, live_server, start_worker, browser, ham_dir, tmp_path, artifacts):
    settings = pg_settings
    with session_factory(settings.database_url)() as session, session.begin():
        create_user(session, "root-admin", "admin-password-1", "admin", get_or_create_program(session, "clinic-a").id)
    server = live_server(settings)
    start_worker(settings)
    s = Steps(browser, server.url, artifacts / "browser")

    # 1. the admin creates a specialist and an uploader
    s.login("root-admin", "admin-password-1")
    s.go("/admin/users")
    for username, role in (("dr-derm", "specialist"), ("clinic-upload", "uploader")):
        form = s.wait(By.ID, "user-form")
        form.find_element(By.NAME, "username").send_keys(username)
        form.find_element(By.NAME, "password").send_keys("long-enough-pass")
        form.find_element(By.NAME, "role").send_keys(role)
        program = form.find_element(By.NAME, "program")
        program.clear()
        program.send_keys("clinic-a")
        s.follow(form.find_element(By.ID, "create-user"))
        s.wait(By.XPATH, f"//table[@id='users']//td[text()='{username}']")
    s.shot("admin-created-users")
    s.logout()

    # 2. the uploader uploads a bulk ZIP and follows the batch to completion
    archive, rows = ham_zip(ham_dir, 12)
    zip_path = tmp_path / "clinic-a.zip"
    zip_path.write_bytes(archive)
    s.login("clinic-upload", "long-enough-pass")
    s.go("/upload")
    s.wait(By.NAME, "archive").send_keys(str(zip_path))
    browser.find_element(By.NAME, "label").send_keys("clinic A morning")
    s.shot("upload-form")
    browser.find_element(By.ID, "bulk-submit").click()
    summary = s.wait(By.ID, "report-summary", 60)
    assert "12" in summary.text and "accepted" in summary.text
    s.shot("upload-report")
    s.follow(browser.find_element(By.ID, "batch-link"))
    # the page polls its status and reloads itself once when the batch completes
    s.wait_text(By.ID, "batch-state", "complete", 180)
    s.wait(By.CSS_SELECTOR, "table#results tbody tr")
    assert len(browser.find_elements(By.CSS_SELECTOR, "table#results tbody tr")) == 12
    histogram = browser.find_element(By.ID, "probability-histogram")
    assert "threshold" in histogram.text
    # the colours agree with the caption around the threshold: every red part of a bar holds
    # studies at or above it, every blue part studies below it; a bin across it is split
    label = histogram.find_element(By.CSS_SELECTOR, "text.threshold-label").text
    threshold = float(label.split("threshold", 1)[1].split()[0])
    parts = browser.execute_script(
        "return Array.from(document.querySelectorAll('#probability-histogram rect')).map("
        "r => [r.getAttribute('class'), r.querySelector('title').textContent])"
    )
    assert parts and {kind for kind, _ in parts} <= {"above", "below"}
    for kind, title in parts:
        low, high = (float(v) for v in title.split(":")[0].split("–"))
        assert (kind == "above" and high > threshold) or (kind == "below" and low < threshold), (kind, title, threshold)
    assert sum(int(t.split(": ")[1].split()[0]) for _, t in parts) == 12
    _one_formatting_rule(browser)
    s.shot("batch-complete")
    s.go("/batches")
    s.wait(By.ID, "batches")
    _one_formatting_rule(browser)
    s.shot("batches")
    # a single upload of an unusable image (a gray card) says so at once: not assessable, retake
    gray = tmp_path / "gray-card.png"
    Image.new("RGB", (400, 300), (128, 128, 128)).save(gray)
    s.go("/upload")
    s.wait(By.NAME, "image").send_keys(str(gray))
    s.follow(browser.find_element(By.ID, "single-submit"))
    verdict = s.wait(By.ID, "not-assessable", 60)
    assert (
        "Not assessable: no contrast" in verdict.text and "retake" in browser.find_element(By.ID, "single-result").text
    )
    s.shot("single-not-assessable")
    s.logout()

    # heat maps are made after scoring, for the referred studies
    def heatmaps_ready():
        with session_factory(settings.database_url)() as session:
            referred = list(session.scalars(select(Referral.study_id).where(Referral.category == "high_risk")))
            made = list(session.scalars(select(Prediction.study_id).where(Prediction.heatmap_sha256.is_not(None))))
            return referred and set(referred) <= set(made)

    wait_for(heatmaps_ready, 120, message="heat maps for the referred studies")

    # 3. the specialist claims the top case, looks at image and heat map, decides
    s.login("dr-derm", "long-enough-pass")
    s.wait(By.ID, "claim-next")
    s.shot("queue")
    s.follow(browser.find_element(By.ID, "claim-next"))
    image = s.wait(By.ID, "lesion")
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)
    )
    heat = browser.find_element(By.ID, "heatmap")
    assert not heat.is_displayed()
    s.shot("case")
    browser.find_element(By.ID, "toggle-heatmap").click()
    WebDriverWait(browser, 10).until(lambda d: heat.is_displayed())
    assert browser.execute_script("return arguments[0].naturalWidth", heat) > 0
    s.shot("case-heatmap")
    # the viewer: the image at its own resolution, fitted; zoomed by key and button, back to fit;
    # brightness, contrast and the heat map's opacity; "h" toggles the map
    frame = browser.find_element(By.ID, "viewer")
    fitted = float(frame.get_attribute("data-scale"))
    natural = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert fitted == pytest.approx(min(frame.size["width"] / natural[0], frame.size["height"] / natural[1]), rel=0.02)
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("+")
    body.send_keys("+")
    assert float(frame.get_attribute("data-scale")) == pytest.approx(fitted * 1.25**2, rel=0.01)
    browser.find_element(By.CSS_SELECTOR, "[data-zoom=actual]").click()
    assert float(frame.get_attribute("data-scale")) == pytest.approx(1.0)
    assert browser.find_element(By.ID, "zoom-level").text == "100 %"
    for slider, value in (("brightness", 140), ("contrast", 120), ("heatmap-opacity", 60)):
        browser.execute_script(
            "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
            browser.find_element(By.ID, slider),
            value,
        )
    assert image.value_of_css_property("filter") == "brightness(1.4) contrast(1.2)"
    assert float(heat.value_of_css_property("opacity")) == pytest.approx(0.6)
    s.shot("case-viewer-zoomed")
    body.send_keys("h")
    assert not heat.is_displayed()
    body.send_keys("0")
    assert float(frame.get_attribute("data-scale")) == pytest.approx(fitted, rel=0.01)
    case_url = browser.current_url
    referral_id = int(case_url.rstrip("/").rsplit("/", 1)[1])
    browser.find_element(By.CSS_SELECTOR, "input[value='biopsy_or_excision']").click()
    browser.find_element(By.NAME, "note").send_keys("asymmetric, irregular border")
    s.follow(browser.find_element(By.ID, "save-decision"))
    s.wait(By.CLASS_NAME, "flash")
    assert "Decision saved" in browser.page_source
    s.shot("decided")
    # found again: "my decided cases", and by the sender's reference in the search
    s.follow(browser.find_element(By.ID, "my-decided"))
    found = s.wait(By.ID, "found")
    assert [a.text for a in found.find_elements(By.CSS_SELECTOR, "tbody td:first-child a")] == [f"#{referral_id}"]
    _one_formatting_rule(browser)
    s.shot("my-decided-cases")
    with session_factory(settings.database_url)() as session:
        reference = session.scalar(select(Study.external_id).join(Referral).where(Referral.id == referral_id))
    s.go("/referrals/search")
    s.wait(By.NAME, "q").send_keys(reference[-5:])
    s.follow(browser.find_element(By.ID, "search"))
    s.follow(s.wait(By.ID, "found").find_element(By.LINK_TEXT, f"#{referral_id}"))
    assert s.wait(By.ID, "decided").text.startswith("Decided: Biopsy or excision")
    # she amends it, saying why
    browser.find_element(By.CSS_SELECTOR, "#amend summary").click()
    browser.find_element(By.CSS_SELECTOR, "#amend-form input[value='routine_follow_up']").click()
    browser.find_element(By.CSS_SELECTOR, "#amend-form textarea[name=reason]").send_keys("re-read: regular network")
    s.shot("case-amend")
    s.follow(browser.find_element(By.ID, "save-amendment"))
    assert s.wait(By.ID, "decided").text.startswith("Decided: Routine follow-up")
    assert "re-read: regular network" in browser.find_element(By.ID, "amendments").text
    s.shot("case-amended")
    # another case, opened from its row in the queue, is claimed from its page and handed over
    s.go("/referrals/")
    s.follow(s.wait(By.CSS_SELECTOR, "#queue tbody tr td a"))
    s.follow(s.wait(By.ID, "claim-this"))
    s.wait(By.ID, "decision-form")
    browser.find_element(By.CSS_SELECTOR, "#handover summary").click()
    s.shot("case-hand-over")
    browser.find_element(By.CSS_SELECTOR, "#handover-form textarea[name=note]").send_keys("second look, please")
    s.follow(browser.find_element(By.ID, "hand-over"))
    assert "second opinion asked" in s.wait(By.CLASS_NAME, "flash").text
    s.logout()

    # 4. the decision is in the audit trail (filtered by what) and its export
    s.login("root-admin", "admin-password-1")
    s.go("/admin/audit?action=decision")
    rows = s.wait(By.ID, "audit").find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 1 and "decision" in rows[0].text and "dr-derm" in rows[0].text
    _one_formatting_rule(browser)
    s.shot("audit-filtered")
    s.go("/admin/model")  # the operating point: ROC curve with the current point
    s.wait(By.ID, "roc-current")
    s.shot("operating-point")
    s.go("/admin/metrics")
    s.wait(By.ID, "headline")
    assert browser.find_element(By.ID, "heatmap-backlog").text == "0" and browser.find_element(By.ID, "latency")
    assert not browser.find_element(By.ID, "metrics").is_displayed()  # the raw rows are folded away
    s.shot("metrics")
    s.go("/admin/users")
    assert "own program only" in s.wait(By.ID, "users").text  # a specialist's scope is shown
    _one_formatting_rule(browser)
    cookies = {c["name"]: c["value"] for c in browser.get_cookies()}
    export = requests.get(server.url + "/admin/audit.csv", cookies=cookies, timeout=30)
    assert export.status_code == 200
    events = list(csv.DictReader(io.StringIO(export.text)))
    decisions = [e for e in events if e["action"] == "decision"]
    assert len(decisions) == 1 and decisions[0]["user"] == "dr-derm" and decisions[0]["object_id"] == str(referral_id)
    assert "biopsy_or_excision" in decisions[0]["detail"] and "irregular border" in decisions[0]["detail"]
    actions = {(e["action"], e["user"]) for e in events}
    assert {
        ("login", "clinic-upload"),
        ("upload", "clinic-upload"),
        ("claim", "dr-derm"),
        ("view", "dr-derm"),
        ("user_created", "root-admin"),
    } <= actions
