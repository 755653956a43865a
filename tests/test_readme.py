"""The README reads quickly (issue 23, item 5): the two commands first, then a short overview in
each language, Korean first, each linking the same docs/ pages, where the detail lives in both languages."""

import re
from pathlib import Path

from flaminko.configuration_flaminko import TRANSFORMERS_WINDOW

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
KOREAN, ENGLISH = README.split('<a name="english"></a>\n## English')
BILINGUAL = ("performance", "conventions", "training", "quantization", "release", "inference", "serving", "evaluation", "demo", "conversion", "transformers_conventions")


def test_the_two_commands_come_first():
    block = README.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert README.index("```bash") < 20
    assert block[0].startswith('pip install torch==2.13.0 && pip install -e ".[eval]" && flaminko demo')
    assert block[1].startswith('pip install torch==2.13.0 && pip install -e ".[test]" && pip install --no-deps '
                               "open-flamingo==2.0.1 open_clip_torch==3.3.0 && python -m pytest -q")


def test_short_and_korean_first():
    assert len(README.splitlines()) < 250
    assert re.search(r"[가-힣]", KOREAN.split("```", 2)[2][:400])  # the first words after the commands are Korean


def test_both_halves_link_the_same_pages_and_they_exist():
    links = [sorted(set(re.findall(r"\]\((docs/[a-z_]+\.md)", half))) for half in (KOREAN, ENGLISH)]
    assert links[0] == links[1]
    assert {f"docs/{name}.md" for name in BILINGUAL} <= set(links[0])
    for link in links[0]:
        assert (ROOT / link).is_file(), link


def test_the_transformers_window_once_per_half_and_no_serve_pin():
    assert "<5.24" not in README and "<5.25" not in README
    for half in (KOREAN, ENGLISH):
        assert half.count(TRANSFORMERS_WINDOW) == 1


def test_docs_pages_say_it_in_both_languages():
    for name in BILINGUAL:
        text = (ROOT / "docs" / f"{name}.md").read_text(encoding="utf-8")
        assert text.index("## 한국어") < text.index("## English"), name
        korean, english = text.split("## English", 1)
        # every table and command block appears in both halves
        assert korean.count("```") == english.count("```"), name
        assert korean.count("|---") == english.count("|---"), name


def test_no_page_or_shipped_file_cites_what_users_do_not_have():
    """Users have the repository only: a page or a shipped file says the point itself, never "see the
    project's design notes" (REFERENCE.md, DESIGN.md, numbered invariants, ../shared)."""
    cited = re.compile(r"REFERENCE(\.md| section)|DESIGN(\.md| invariant)|\binvariants? \d|불변식 ?\d|\.\./shared|/work/shared")
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "flaminko").rglob("*.py"), *(ROOT / "examples").iterdir()]
    offending = [f"{path.relative_to(ROOT)}: {match.group(0)}" for path in files for match in cited.finditer(path.read_text(encoding="utf-8"))]
    assert not offending, offending
