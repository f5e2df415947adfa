"""Publishes a finished reproduction on the docs site: the results table and the claims of
<workdir>/results.md go between the markers of docs/results.md (the prose around them is
kept), and three of its figures into docs/results/. The command that regenerates the
committed results:

  icl-jax reproduce --workdir runs/reproduce
  python launch/publish_results.py --workdir runs/reproduce [--page docs/results.md]

`icl-jax reproduce` itself writes only into its workdir.
"""
import argparse
import os
import shutil
import sys

START, END = "<!-- results:start -->", "<!-- results:end -->"
PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                    "results.md")
# <workdir>/<source> -> <page's folder>/results/<name>
FIGURES = {"family.png": "family.png", "pca.png": "pca.png",
           os.path.join("2l", "head_scores.png"): "2l_head_scores.png"}


def publish(workdir: str, page: str = PAGE) -> str:
    """Replaces the block between START and END in `page` (appended if absent) with the
    reproduction's results and figures; returns the page's path."""
    figures = os.path.join(os.path.dirname(os.path.abspath(page)), "results")
    os.makedirs(figures, exist_ok=True)
    for src, dst in FIGURES.items():
        shutil.copyfile(os.path.join(workdir, src), os.path.join(figures, dst))
    with open(os.path.join(workdir, "results.md")) as f:
        results = f.read().split("\n", 1)[1].strip()  # without its title
    body = "\n".join([
        START, "", results.replace("## The paper's claims", "**The paper's claims**"), "",
        "![ICL score and prefix matching of every model](results/family.png)", "",
        "![per-token loss PCA](results/pca.png) ![2L heads](results/2l_head_scores.png)", "",
        END])
    with open(page) as f:
        text = f.read()
    if START in text and END in text:
        a, b = text.index(START), text.index(END) + len(END)
        text = text[:a] + body + text[b:]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    with open(page, "w") as f:
        f.write(text)
    return page


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a finished `icl-jax reproduce` workdir")
    p.add_argument("--page", default=PAGE, help="the docs page to update (default: %(default)s)")
    args = p.parse_args(argv)
    missing = [n for n in ("results.md", *FIGURES) if not os.path.exists(
        os.path.join(args.workdir, n))]
    if missing:
        print(f"error: {args.workdir} holds no finished reproduction (missing "
              f"{', '.join(missing)}); run icl-jax reproduce --workdir {args.workdir} first",
              file=sys.stderr)
        return 2
    print(f"updated {publish(args.workdir, args.page)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
