"""Every measured number in the documentation names the committed results file it comes from.

A section (heading to heading) of README.md, kdad/**/README.md or experiments/**/README.md that
holds a measured-looking figure (a mean ± std, a decimal percentage, a ratio such as 1.15x, a
timing in s or ms, a throughput, or a metric value next to a metric's name) must link or name
a results file (a .md, .csv or .json file other than a README) that exists in the repository.
Numbers quoted from a paper are marked ``<!-- numbers: quoted from ... -->`` in their section.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(
    [ROOT / "README.md", *ROOT.glob("kdad/**/README.md"), *ROOT.glob("experiments/**/README.md")]
)
MEASURED = [
    re.compile(r"\d\s*±\s*\d"),  # mean ± std
    re.compile(r"\b\d+\.\d+\s?%"),  # 93.70 %
    re.compile(r"\b\d+(\.\d+)?x\b"),  # 1.28x
    re.compile(r"\b\d+(\.\d+)?\s?(s|ms)\b(?!\w)"),  # 37 s, 4.2 ms
    re.compile(r"\b\d[\d,.]*\s?(img|images)/s\b"),  # 178 images/s
    re.compile(
        r"(AUROC|AUPRO|PRO|AP|F1)[^.\n|]{0,40}?\b(0\.\d{2,4}|\d{2}\.\d{1,2})\b", re.IGNORECASE
    ),
]
QUOTED = re.compile(r"<!--\s*numbers:\s*quoted from [^>]+-->")
# A results file: a link or a path to a .md/.csv/.json file that is not a README.
PATH = re.compile(r"(?:\]\(|`|\s|\()((?:\.\./|\./)?[\w./-]+\.(?:md|csv|json))\b")


def sections(text: str) -> list[tuple[str, str]]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # commands, not claims
    parts = re.split(r"(?m)^(#{1,4} .*)$", text)
    out, heading = [], "(top)"
    for part in parts:
        if re.match(r"#{1,4} ", part):
            heading = part.strip()
        elif part.strip():
            out.append((heading, part))
    return out


def cited_files(doc: Path, body: str) -> list[Path]:
    found = []
    for match in PATH.findall(body):
        target = match.split("#")[0].rstrip(".,:;)")
        if Path(target).name == "README.md":
            continue
        for base in (doc.parent, ROOT):
            candidate = (base / target).resolve()
            if candidate.exists():
                found.append(candidate)
                break
    return found


def measured(body: str) -> list[str]:
    body = re.sub(r"`[^`]*`", "", body)  # inline code: keys and values, not results
    return [m.group(0) for pattern in MEASURED for m in pattern.finditer(body)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_measured_number_names_an_existing_results_file(doc: Path) -> None:
    unbacked = []
    for heading, body in sections(doc.read_text()):
        numbers = measured(body)
        if numbers and not QUOTED.search(body) and not cited_files(doc, body):
            unbacked.append(f"{heading}: {numbers[:4]}")
    assert not unbacked, f"{doc.relative_to(ROOT)}: numbers without a results file:\n" + "\n".join(
        unbacked
    )


def test_the_check_sees_an_unbacked_number(tmp_path: Path) -> None:
    doc = tmp_path / "README.md"
    doc.write_text("# x\n\nRD4AD reached image AUROC 0.936 in 37 s.\n")
    body = sections(doc.read_text())[0][1]
    assert measured(body) and not cited_files(doc, body)
    doc.write_text("# x\n\nRD4AD reached 93.6 ± 0.4 ([table](results/a.md)).\n")
    (tmp_path / "results").mkdir()
    assert not cited_files(doc, sections(doc.read_text())[0][1])  # the file must exist
    (tmp_path / "results" / "a.md").write_text("| a |\n")
    assert cited_files(doc, sections(doc.read_text())[0][1])
