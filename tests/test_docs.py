"""The docs cannot rot silently: links, section references and parameters are checked, fast and offline.

(a) Links. Every relative link in every Markdown file of the repository (tracked, or new and not git-ignored:
    ``git ls-files --cached --others --exclude-standard '*.md'``): ``[text](path)``, ``[text](path#anchor)``,
    ``[text](#anchor)``, ``![alt](path)``, ``[name]: path`` definitions and HTML ``<img src>`` / ``<a href>``,
    outside code blocks and code spans, names a file of the repository, and each ``#anchor`` is a heading of the
    target under GitHub's rules (the heading's text lower-cased, every character but letters, digits, ``_``, ``-``
    and spaces dropped, spaces turned into ``-``; a repeated heading gets ``-1``, ``-2``, ...) or an explicit
    ``<a id="...">`` / ``<a name="...">``.
(b) Section references in code. src/, stages/, bench/, recipes/, params.yaml, dvc.yaml and the Makefile point at the
    docs in these styles, and each must name an existing file and heading:
      ``docs/training.md § "Resume"``, ``README § "The book's runs"`` (more headings: ``, "Another"``);
      ``README "Working as a team", "A DVC remote"`` (quoted headings right after the file, as messages say it);
      ``docs/fastai.md §2.7``, ``§1.1-§1.3``, ``§3.4, §3.5`` (numbered sections: a heading that starts ``§2.7 ``).
    A ``§`` followed by neither a quote nor a number is an error (where such a reference ends cannot be told), and
    every ``docs/X.md`` or ``README.md`` named must exist.
(c) Parameters. Every leaf key of params.yaml, as its dotted path (``train.channels_last``,
    ``index.labels_csv.path``; a list is a leaf), is documented: it appears in backticks, `` `train.channels_last` ``,
    in a table row (a line starting with ``|``) of README.md or a docs/*.md page. The convention: each page of the
    guide ends its topic with a table of the parameters it covers, one row per key.
(d) The README's figures. The quick start's numbers and times (the default run's metrics and time, the shared
    subset's error and time per epoch, the full dataset's time derived from the subset's rate) and the speed ratio
    under "Development" are those of the results files each line names, read here; params.yaml and the Makefile
    give the default run's time as the README does.
Each rule's checker is tested on small broken inputs too, so that a checker that finds nothing fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_PREFIXES = (".venv/", ".venv-bench/", "mlartifacts/", "mlruns/", "data/", "models/", ".cache/")
# where code may point at the docs
REFERENCE_SOURCES = ("src", "stages", "bench", "recipes", "params.yaml", "dvc.yaml", "Makefile")
REFERENCE_SUFFIXES = {".py", ".yaml", ".yml", ".sh", ""}

# ---------------------------------------------------------------------------------------------------------------------
# Markdown: code blocks, headings, anchors, links

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
EXPLICIT_ANCHOR = re.compile(r"""<a\s+[^>]*?\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
LINK_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_SOURCE = re.compile(r"""<(?:img|a)\s[^>]*?\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose_lines(markdown: str) -> Iterable[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    fence = None
    for number, line in enumerate(markdown.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
            fence = None
        elif fence is None:
            yield number, line


def heading_text(raw: str) -> str:
    """A heading's text as GitHub renders it: code spans' content, links' text, no HTML tags or emphasis stars."""
    text = CODE_SPAN.sub(lambda m: m.group(2).strip(), raw)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    return text.replace("*", "").strip()


def slugify(text: str) -> str:
    """GitHub's heading anchor: lower case; letters, marks, digits, connector punctuation (``_``), ``-`` and spaces
    kept, everything else dropped; each space a ``-``."""
    kept = (
        c for c in text.lower() if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc"
    )
    return "".join(kept).replace(" ", "-")


def headings(markdown: str) -> list[str]:
    """The text of every heading, in order (code blocks skipped)."""
    return [heading_text(m.group(2)) for _, line in prose_lines(markdown) if (m := HEADING.match(line))]


def anchors(markdown: str) -> set[str]:
    """Every anchor a link may name in this file: the headings' slugs (-1, -2, ... for repeats) and explicit ids."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for text in headings(markdown):
        slug = slugify(text)
        if slug in seen:
            seen[slug] += 1
            found.add(f"{slug}-{seen[slug]}")
        else:
            seen[slug] = 0
            found.add(slug)
    found.update(EXPLICIT_ANCHOR.findall(markdown))
    return found


def links(markdown: str) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code, as written."""
    found = []
    for number, line in prose_lines(markdown):
        definition = LINK_DEFINITION.match(line)
        if definition:
            found.append((number, definition.group(1)))
            continue
        prose = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        found += [(number, m.group(1)) for m in INLINE_LINK.finditer(prose)]
        found += [(number, m.group(1)) for m in HTML_SOURCE.finditer(prose)]
    return found


def repo_files(root: Path) -> set[str]:
    """The repository's files (posix paths from the root): tracked, or new and not git-ignored."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = {name for name in out.split("\0") if name}
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but the skipped folders
        files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    return {f for f in files if not f.startswith(SKIPPED_PREFIXES) and (root / f).exists()}


def markdown_files(files: Iterable[str]) -> list[str]:
    return sorted(f for f in files if f.endswith(".md"))


def broken_links(root: Path, md_files: Iterable[str], files: set[str]) -> list[str]:
    """One message per relative link whose file is not in ``files`` (or a folder of them) or whose anchor is not in
    its target."""
    folders = {parent.as_posix() for f in files for parent in Path(f).parents}
    texts: dict[str, str] = {}

    def text(name: str) -> str:
        if name not in texts:
            texts[name] = (root / name).read_text(encoding="utf-8")
        return texts[name]

    problems = []
    for source in md_files:
        for number, target in links(text(source)):
            if not target or SCHEME.match(target) or target.startswith("//"):
                continue
            path, _, anchor = target.partition("#")
            if path:
                if path.startswith("/"):
                    problems.append(f"{source}:{number}: {target}: an absolute path; link relative to the file")
                    continue
                resolved = Path(source).parent / path
                name = Path(*[p for p in resolved.parts if p != "."]).as_posix()
                parts: list[str] = []
                for part in Path(name).parts:
                    if part == "..":
                        if not parts:
                            break
                        parts.pop()
                    else:
                        parts.append(part)
                else:
                    name = "/".join(parts)
                    if name in files or name in folders:
                        if anchor and name.endswith(".md") and anchor not in anchors(text(name)):
                            problems.append(f"{source}:{number}: {target}: no heading or anchor #{anchor} in {name}")
                        continue
                problems.append(f"{source}:{number}: {target}: no such file in the repository")
            elif anchor not in anchors(text(source)):
                problems.append(f"{source}:{number}: {target}: no heading or anchor #{anchor} in {source}")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# Section references in code

DOC = r"(?<![\w/.-])(README(?:\.md)?|docs/[\w.-]+?\.md)"
NUMBER = r"§\s*\d+(?:\.\d+)*"
QUOTED_REFERENCE = re.compile(DOC + r"\s*(?:§\s*)?(\"[^\"\n]+\"(?:\s*,\s*\"[^\"\n]+\")*)")
NUMBERED_REFERENCE = re.compile(DOC + rf"\s*({NUMBER}(?:\s*(?:[-–]\s*§?|,\s*§)\s*\d+(?:\.\d+)*)*)")
UNQUOTED_REFERENCE = re.compile(DOC + r"\s*§(?!\s*[\d\"])\s*(\S*)")
DOC_NAME = re.compile(DOC)


def doc_file(name: str) -> str:
    return "README.md" if name in ("README", "README.md") else name


def broken_references(root: Path, sources: Mapping[str, str]) -> list[str]:
    """One message per reference to the docs, in ``sources`` (name -> text), that names a missing file or heading,
    or that cannot be checked (``§`` without a quoted heading or a number after it)."""
    problems = []
    for source, text in sources.items():
        for match in DOC_NAME.finditer(text):
            name = doc_file(match.group(1))
            if not (root / name).is_file():
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{source}:{line}: {match.group(1)}: no such file")
        for match in QUOTED_REFERENCE.finditer(text):
            name, line = doc_file(match.group(1)), text.count("\n", 0, match.start()) + 1
            if not (root / name).is_file():
                continue
            slugs = {slugify(h) for h in headings((root / name).read_text(encoding="utf-8"))}
            for wanted in re.findall(r"\"([^\"]+)\"", match.group(2)):
                if slugify(wanted) not in slugs:
                    problems.append(f'{source}:{line}: {match.group(1)} "{wanted}": no such heading in {name}')
        for match in NUMBERED_REFERENCE.finditer(text):
            name, line = doc_file(match.group(1)), text.count("\n", 0, match.start()) + 1
            if not (root / name).is_file():
                continue
            numbers = {
                m.group(1) for h in headings((root / name).read_text(encoding="utf-8")) if (m := re.match(r"§(\S+)", h))
            }
            for wanted in re.findall(r"\d+(?:\.\d+)*", match.group(2)):
                if wanted not in numbers:
                    problems.append(f"{source}:{line}: {match.group(1)} §{wanted}: no such section in {name}")
        for match in UNQUOTED_REFERENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            word = match.group(2).strip(",.;:)'\"")
            problems.append(
                f'{source}:{line}: {match.group(0)!r}: quote the heading after §, e.g. {match.group(1)} § "{word}..."'
            )
    return problems


def reference_sources(root: Path, files: Iterable[str]) -> dict[str, str]:
    chosen = {}
    for name in sorted(files):
        top = name.split("/", 1)[0]
        if top in REFERENCE_SOURCES and Path(name).suffix in REFERENCE_SUFFIXES:
            chosen[name] = (root / name).read_text(encoding="utf-8")
    return chosen


# ---------------------------------------------------------------------------------------------------------------------
# Parameters


def leaf_keys(mapping: Mapping, prefix: str = "") -> list[str]:
    """Dotted paths of the values that are not mappings (a list is a leaf)."""
    keys = []
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        keys += leaf_keys(value, f"{path}.") if isinstance(value, Mapping) else [path]
    return keys


def undocumented_keys(keys: Iterable[str], pages: Iterable[str]) -> list[str]:
    """The keys that no table row of ``pages`` names in backticks."""
    rows = "\n".join(line for page in pages for line in page.splitlines() if line.lstrip().startswith("|"))
    return [key for key in keys if f"`{key}`" not in rows]


def guide_pages(root: Path) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]]


# ---------------------------------------------------------------------------------------------------------------------
# The repository's docs


def test_every_relative_link_and_anchor_in_the_markdown_files_resolves() -> None:
    files = repo_files(ROOT)
    assert "README.md" in files
    problems = broken_links(ROOT, markdown_files(files), files)
    assert not problems, "\n".join(problems)


def test_every_reference_to_a_docs_section_in_the_code_names_an_existing_heading() -> None:
    sources = reference_sources(ROOT, repo_files(ROOT))
    assert "params.yaml" in sources and "src/petbreeds/learn/calibration.py" in sources
    problems = broken_references(ROOT, sources)
    assert not problems, "\n".join(problems)


def test_every_params_yaml_key_is_documented_in_a_table_of_the_guide() -> None:
    keys = leaf_keys(YAML(typ="safe").load((ROOT / "params.yaml").read_text(encoding="utf-8")))
    assert "train.channels_last" in keys and "index.labels_csv.path" in keys
    missing = undocumented_keys(keys, guide_pages(ROOT))
    assert not missing, f"params.yaml keys no table row of README.md or docs/*.md names in backticks: {missing}"


# ---------------------------------------------------------------------------------------------------------------------
# The checkers, on broken inputs


def test_slugify_follows_githubs_rules() -> None:
    assert slugify("The book's runs") == "the-books-runs"
    assert (
        slugify("§2.7 Sharpness of the batches: what was measured") == "27-sharpness-of-the-batches-what-was-measured"
    )
    assert (
        slugify(heading_text("Model (`train.channels_last`, `learn/model.py`)"))
        == "model-trainchannels_last-learnmodelpy"
    )
    assert slugify("Scaling out: GPUs — and machines") == "scaling-out-gpus--and-machines"
    md = '# Setup\n\n## Setup\n\n```bash\n# Setup\n```\n\n## Setup\n<a id="custom"></a>\n'
    assert anchors(md) == {"setup", "setup-1", "setup-2", "custom"}


def _write(root: Path, files: Mapping[str, str]) -> set[str]:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return set(files)


def test_a_broken_link_or_a_missing_anchor_is_found(tmp_path: Path) -> None:
    files = _write(
        tmp_path,
        {
            "README.md": (
                "# Top\n\n## Quick start\n\n"
                "[ok](docs/guide.md#the-books-runs) [ok](#quick-start) ![ok](docs/img/a.png) [web](https://x.org/#y)\n"
                "[gone](docs/missing.md) [no anchor](docs/guide.md#training) [self](#nowhere)\n"
                "`[in code](docs/missing.md)`\n\n```\n[in a block](docs/missing.md)\n```\n[def]: docs/nothing.md\n"
                '<img src="docs/img/a.png" width="9"> <img src="docs/img/b.png">\n'
            ),
            "docs/guide.md": "# Guide\n\n## The book's runs\n\n[up](../README.md#top) [up](../README.md#bottom)\n",
            "docs/img/a.png": "",
        },
    )
    problems = broken_links(tmp_path, markdown_files(files), files)
    assert [p.split(": ", 1)[0] + ": " + p.split(": ")[1] for p in problems] == [
        "README.md:6: docs/missing.md",
        "README.md:6: docs/guide.md#training",
        "README.md:6: #nowhere",
        "README.md:12: docs/nothing.md",
        "README.md:13: docs/img/b.png",
        "docs/guide.md:5: ../README.md#bottom",
    ], problems
    assert "no heading or anchor #training in docs/guide.md" in problems[1]
    # a file that exists on disk but is not part of the repository (git-ignored) is no target either
    assert broken_links(tmp_path, ["docs/guide.md"], files - {"README.md"})[0].endswith(
        "no such file in the repository"
    )


def test_a_reference_to_a_missing_file_heading_or_section_is_found(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "README.md": "# petbreeds\n\n## Working as a team\n\n### A DVC remote\n",
            "docs/training.md": "# Training\n\n## The book's runs\n\n## Resume (`resume.every_epochs`)\n",
            "docs/fastai.md": "# fastai\n\n## §1 Data\n\n### §1.1 Files\n\n### §1.3 Vocab\n\n## §2 Augment\n",
        },
    )
    good = {
        "a.py": '"""README "Working as a team", "A DVC remote"; docs/training.md § "The book\'s runs"."""',
        "b.yaml": '# docs/training.md § "Resume (resume.every_epochs)"; docs/fastai.md §1.1-§1.3, §2; README.md',
    }
    assert broken_references(tmp_path, good) == []
    bad = {
        "c.py": (
            '# README § "Speed"\n'
            '# docs/training.md § "The model", "The book\'s runs"\n'
            "# docs/fastai.md §1.2, §2\n"
            "# README § Speed\n"
            "# docs/speed.md\n"
        )
    }
    assert broken_references(tmp_path, bad) == [
        "c.py:5: docs/speed.md: no such file",
        'c.py:1: README "Speed": no such heading in README.md',
        'c.py:2: docs/training.md "The model": no such heading in docs/training.md',
        "c.py:3: docs/fastai.md §1.2: no such section in docs/fastai.md",
        "c.py:4: 'README § Speed': quote the heading after §, e.g. README § \"Speed...\"",
    ]


def test_an_undocumented_params_key_is_found() -> None:
    params = YAML(typ="safe").load(
        "seed: 1\ntrain:\n  channels_last: true\n  lr: [1, 2]\nindex:\n  csv:\n    path: a\n"
    )
    keys = leaf_keys(params)
    assert keys == ["seed", "train.channels_last", "train.lr", "index.csv.path"]
    page = (
        "| key | meaning |\n|---|---|\n| `seed` | the seed |\n| `train.channels_last`, `index.csv.path` | ... |\n\n"
        "`train.lr` in prose does not count, nor `train.channels` as a prefix.\n"
    )
    assert undocumented_keys(keys, [page]) == ["train.lr"]
    assert undocumented_keys(["train.channels"], [page]) == ["train.channels"]


# ---------------------------------------------------------------------------------------------------------------------
# (d) The README's figures come from the results files it names

RESULT_FILE = re.compile(r"bench/results/[\w.-]+\.json")
# The full dataset's training split (fastai's RandomSplitter(0.2) of 7,390 images: docs/fastai.md §1.4)
FULL_TRAIN_IMAGES = 5912


def minutes_seconds(seconds: float) -> str:
    """A time as the README writes it: to the nearest 10 s, ``2 min 40 s`` (``about`` for a derived one is prose)."""
    minutes, secs = divmod(round(seconds / 10) * 10, 60)
    return f"{minutes} min {secs} s" if secs else f"{minutes} min"


def readme_line(readme: str, *markers: str) -> tuple[str, dict]:
    """The one README line holding every marker, and the results file it names, parsed."""
    (line,) = [line for line in readme.splitlines() if all(m in line for m in markers)]
    (name,) = set(RESULT_FILE.findall(line))
    return line, json.loads((ROOT / name).read_text(encoding="utf-8"))


def figures(line: str) -> list[str]:
    """The decimal numbers of a line (``0.2458``, ``28.5``, ``2.70``), as written."""
    return re.findall(r"(?<![\w.-])\d+\.\d+(?![\w.])", line)


def test_the_readme_quick_start_figures_come_from_the_results_files_it_names() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    # the default run: metrics, chance (1/37, not from a file), time, machine and date
    line, repro = readme_line(readme, "| `make repro` |")
    (repro_file,) = set(RESULT_FILE.findall(line))
    machine = repro["machine"]
    assert figures(line) == [f"{repro['error_rate']:.4f}", f"{1 - 1 / 37:.3f}", f"{repro['valid_loss']:.4f}"]
    assert f"{minutes_seconds(repro['total_s'])} once installed" in line
    assert f"on {machine['cores']} cores of an {machine['cpu_model']}, {machine['date'][:10]}" in line
    # the shared subset: error and time per training epoch, petbreeds' medians, with what ran
    line, vs = readme_line(readme, "| 1,029 photos")
    ours, recipe = vs["medians"]["petbreeds"], vs["recipe"]
    assert figures(line) == [f"{ours['error_rate']:.4f}", f"{ours['s_per_epoch']:.1f}"]
    assert f"{vs['data']['images']:,} photos" in line and f"batch {recipe['batch_size']}" in line
    assert f"on {vs['machine']['cores']} cores of an {vs['machine']['cpu_model']}, {vs['machine']['date'][:10]}" in line
    assert recipe["arch"] in readme.split("| data | error_rate")[0].splitlines()[-2]  # the sentence above the table
    # the full dataset: the subset's measured rate, applied to its training images
    line, same = readme_line(readme, "| the full dataset")
    assert same == vs
    rate = ours["images_per_s"]
    assert figures(line) == [f"{rate:.1f}"]
    assert f"about {minutes_seconds(FULL_TRAIN_IMAGES / rate)} on the same 2 cores" in line
    assert f"{FULL_TRAIN_IMAGES:,} training photos" in line
    # the speed ratio, with what ran
    paragraph = " ".join(readme.split("## Development")[1].split("\n\n")[2].split())  # the one after the commands
    line, named = readme_line(paragraph, "× as many images per second")
    assert named == vs and f"{vs['ratios']['images_per_s']:.2f}×" in line
    assert f"{recipe['arch']} in place of resnet34, at batch {recipe['batch_size']}" in line
    assert f"on the {vs['data']['images']:,} photos" in line
    # one figure for the default run's time everywhere it is given
    for name in ("params.yaml", "Makefile"):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert minutes_seconds(repro["total_s"]) in text and RESULT_FILE.findall(text) == [repro_file], name
