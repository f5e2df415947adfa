"""report.html and the attention view's page in a real browser (headless Chromium, as .ci/run
installs it): no console error, no image that fails to load, the claims table visible where
the page opens, a link to a claim's checks opening them, nothing fetched but the page; and the
checks themselves fail on a broken page."""
import os
import re

import numpy as np
import pytest

from browser import Browser, chromium
from icl_jax import analysis, attention_view, report
from report_family import family_page  # noqa: F401

pytestmark = pytest.mark.skipif(chromium() is None, reason="chromium is not installed "
                                "(.ci/run installs it: apt-get install -y chromium)")

IMAGES_BROKEN = ("[...document.images].filter(i => !(i.complete && i.naturalWidth > 0))"
                 ".map(i => i.alt)")
CLAIMS_SHOWN = """(() => {
  const t = document.getElementById("claims-table");
  if (!t) return "no claims table";
  const r = t.getBoundingClientRect(), s = getComputedStyle(t);
  if (s.display === "none" || s.visibility !== "visible" || r.height < 50 || r.width < 300)
    return "hidden: " + JSON.stringify([s.display, s.visibility, r.height, r.width]);
  const top = r.top + window.scrollY;
  if (top > 2 * window.innerHeight) return "too far down: " + top;
  return t.querySelectorAll("tr[id^=claim-]").length;
})()"""


def _screenshot_dir(tmp_path):
    """Where screenshots go: $ICL_JAX_SCREENSHOTS if set (to look at them), else tmp_path."""
    d = os.environ.get("ICL_JAX_SCREENSHOTS") or str(tmp_path)
    os.makedirs(d, exist_ok=True)
    return d


def _check_page(page, n_images):
    assert page.errors == []
    assert page.evaluate("document.images.length") == n_images
    assert page.evaluate(IMAGES_BROKEN) == []
    # everything the page asked for is itself or inline
    assert all(u.startswith(("file://", "data:")) for u in page.requests), page.requests


def test_the_report_renders_with_every_image_and_the_claims_table_in_view(family_page,
                                                                         tmp_path):
    _, path = family_page
    n_images = open(path).read().count("<img ")
    with Browser() as b:
        page = b.open(path)
        _check_page(page, n_images)
        assert page.evaluate(CLAIMS_SHOWN) == 4
        page.screenshot(os.path.join(_screenshot_dir(tmp_path), "report_top.png"))
        # a deciding check's "all N checks" opens the collapsed checks of its claim
        assert page.evaluate("document.getElementById('checks-1').open") is False
        page.evaluate("document.querySelector(\"a[href='#checks-1']\").click()")
        assert page.evaluate("document.getElementById('checks-1').open") is True
        assert page.evaluate("document.getElementById('checks-1').getBoundingClientRect()"
                             ".height") > 100
        # the attention view inside it works too: hovering a token shades the keys
        shaded = page.evaluate("""(() => {
          const toks = document.querySelectorAll(".av-tok");
          toks[10].dispatchEvent(new MouseEvent("mouseenter"));
          return [...toks].slice(0, 12).map(t => t.style.background);
        })()""")
        assert all(s.startswith("rgba(220, 60, 30") for s in shaded) and \
            shaded[11] == "rgba(220, 60, 30, 0)"  # after the query: nothing
        page.screenshot(os.path.join(_screenshot_dir(tmp_path), "report_full.png"),
                        full_page=True)
        assert page.errors == []


def test_the_browser_check_fails_on_a_broken_image_a_script_error_or_a_hidden_table(
        family_page, tmp_path):
    """The checks above can come out the other way."""
    _, path = family_page
    good = open(path).read()
    i = good.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = good[:i] + "AAAA" + good[i + 40:]
    hidden = good.replace("<table id='claims-table'", "<table id='claims-table' "
                          "style='display:none'")
    failing = good.replace("</body>", "<script>undefinedFunction()</script></body>")
    for name, text in (("broken", broken), ("hidden", hidden), ("failing", failing)):
        (tmp_path / f"{name}.html").write_text(text)
    with Browser() as b:
        assert len(b.open(tmp_path / "broken.html").evaluate(IMAGES_BROKEN)) == 1
        assert b.open(tmp_path / "hidden.html").evaluate(CLAIMS_SHOWN).startswith("hidden")
        errors = b.open(tmp_path / "failing.html").errors
        assert len(errors) == 1 and "undefinedFunction" in errors[0]


def test_a_real_runs_report_renders(trained_2l, tmp_path):
    """The page of a run trained here (one run: no claims), its attention view included."""
    _, workdir = trained_2l
    result = analysis.analyze([str(workdir)], out=str(tmp_path / "analysis"), chunk=8,
                              progress=False)
    path = report.write_report(result, progress=False)
    with Browser() as b:
        page = b.open(path)
        _check_page(page, open(path).read().count("<img "))
        assert page.evaluate("document.querySelectorAll('section').length") >= 6
        assert page.evaluate("document.querySelector('.av-tokens').children.length") == \
            len(result["last"]["2l"].inputs["probe_BT"][0])


def test_the_attention_view_page_renders_and_answers_a_hover(tmp_path):
    rng = np.random.default_rng(0)
    att = np.tril(rng.random((2, 3, 9, 9)))
    att /= att.sum(-1, keepdims=True)
    tokens = ["<bos>", "a", "</script>", "b", "a", "b", "c", "d", "&"]
    path = attention_view.write(tmp_path / "view.html", tokens, att, head=(1, 2),
                                title="a view")
    with Browser() as b:
        page = b.open(path)
        assert page.errors == []
        assert all(u.startswith(("file://", "data:")) for u in page.requests), page.requests
        assert page.evaluate("document.querySelectorAll('select option').length") == 6
        assert page.evaluate("document.querySelector('select').value") == "5"
        texts = page.evaluate("[...document.querySelectorAll('.av-tok')].map(t => t.textContent)")
        assert texts == tokens
        assert page.evaluate("getComputedStyle(document.querySelector('.av-tokens')).display")\
            != "none"
        q = 6
        shades = page.evaluate(f"""(() => {{
          const toks = document.querySelectorAll(".av-tok");
          toks[{q}].dispatchEvent(new MouseEvent("mouseenter"));
          return [...toks].map(t => Number(t.style.background.match(/([0-9.]+)\\)$/)[1]));
        }})()""")
        # the browser keeps an alpha in 8 bits
        np.testing.assert_allclose(shades, np.where(np.arange(9) <= q, att[1, 2, q], 0),
                                   atol=1 / 255)
        info = page.evaluate("document.querySelector('.av-info').textContent")
        assert re.match(rf"L1H2: query {q} \(c\) attends most to key "
                        rf"{int(np.argmax(att[1, 2, q]))}", info), info
        page.screenshot(os.path.join(_screenshot_dir(tmp_path), "attention_view.png"))
        assert page.errors == []


def test_the_seeds_page_renders_and_links_each_seeds_report(family_page, tmp_path):
    """reproduce --seeds' page (report.write_robustness): verdicts coloured, each seed's
    link leads to its report, which opens with its claims table."""
    import shutil
    from urllib.parse import unquote, urlparse
    seed_dir = tmp_path / "s0"
    shutil.copytree(os.path.dirname(family_page[1]), seed_dir)
    text = ("# Robustness: profile `quick`, seeds 0\n\n| claim | supported |\n| --- | --- |\n"
            "| 1. Co-occurrence | 1 |\n\n| seed | 1. Co-occurrence |\n| --- | --- |\n"
            "| 0 | supported |\n")
    path = report.write_robustness(tmp_path, text, {0: "s0/report.html"})
    with Browser() as b:
        page = b.open(path)
        _check_page(page, 0)
        assert page.evaluate("document.querySelectorAll('.verdict.ok').length") == 1
        hrefs = page.evaluate("[...document.querySelectorAll('#seeds a')].map(a => a.href)")
        assert len(hrefs) == 1
        seed_page = unquote(urlparse(hrefs[0]).path)
        assert os.path.exists(seed_page)
        page = b.open(seed_page)
        _check_page(page, open(seed_page).read().count("<img "))
        assert page.evaluate(CLAIMS_SHOWN) == 4
