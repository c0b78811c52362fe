"""README.md as a user reads it: every ```python block runs as shown, in a fresh process and
an empty folder, with warnings turned into errors; links stay inside the repository."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
README = os.path.join(ROOT, "README.md")
DOCS = [README] + [os.path.join(ROOT, "docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                   if f.endswith(".md")]


def python_blocks(path=README):
    with open(path) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


BLOCKS = python_blocks()


def run_block(code, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_readme_shows_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_shown(index, tmp_path):
    """Each block runs alone. Warnings are errors: in the "Specs with rules" example a rule
    that matches no site of the model shown would warn. A block whose last line prints the
    report with a comment (`print(normswap.report(model))   # 39 converted, ...`) must print
    exactly that summary."""
    block = BLOCKS[index]
    res = run_block(block, tmp_path)
    assert res.returncode == 0, f"README block {index} failed:\n{block}\n{res.stderr[-4000:]}"
    said = re.search(r"^print\(normswap\.report\(model\)\)\s+#\s*(\d+ converted.*)$", block, flags=re.M)
    if said:
        assert res.stdout.strip().splitlines()[-1].strip() == said.group(1).strip()


def test_specs_with_rules_example_states_what_it_prints():
    block = next(b for b in BLOCKS if "normswap.Spec(" in b)
    assert re.search(r"^print\(normswap\.report\(model\)\)\s+#\s*\d+ converted", block, flags=re.M)


@pytest.mark.parametrize("path", DOCS, ids=os.path.basename)
def test_docs_link_only_to_files_of_the_repository(path):
    with open(path) as f:
        text = f.read()
    for name in ("PAPERS.md", "DESIGN.md"):  # the project's private notes are not shipped
        assert name not in text, f"{path} refers to {name}"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        assert os.path.exists(os.path.join(os.path.dirname(path), target)), f"{path}: broken link {target}"


def test_methods_doc_anchors_exist():
    """Links into docs/methods.md, from the README and from its own contents line."""
    with open(README) as f:
        anchors = re.findall(r"\]\(docs/methods\.md#([^)]+)\)", f.read())
    with open(os.path.join(ROOT, "docs", "methods.md")) as f:
        text = f.read()
    anchors += re.findall(r"\]\(#([^)]+)\)", text)
    headings = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]

    def slug(h):  # GitHub's rule: lower case, drop punctuation, spaces -> dashes
        return re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-")
    assert anchors
    for a in anchors:
        assert a in {slug(h) for h in headings}, a
