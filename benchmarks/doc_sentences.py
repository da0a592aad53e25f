"""Real English sentences from the documentation that Debian packages ship (for the 1M set).

Each source is a Debian package fetched with ``apt-get download`` and unpacked
with ``dpkg -x`` into the dataset cache (nothing is installed). Prose is taken
from the markup each package ships (reStructuredText, HTML, POD, roff), code
blocks and markup are dropped, paragraphs are split into sentences, and only
sentences of 5-80 words with at least four plain words are kept (signatures
and tables mostly fall out). Only vectors are cached, never the text.

=====================  ===========================================  ======================
package                what                                         licence (its copyright)
=====================  ===========================================  ======================
linux-doc-6.1          kernel Documentation/ (.rst, .txt)           GPL-2
python3.11-doc         Python 3.11 manual (HTML)                    PSF-2
python-django-doc      Django 3.2 manual (HTML)                     BSD-3-clause
postgresql-doc-15      PostgreSQL 15 manual (HTML)                  PostgreSQL (BSD-like)
git-doc                Git manual pages and guides (AsciiDoc)       GPL-2
perl-doc               Perl 5.36 POD manual                         GPL-1+ or Artistic
manpages, -dev         Linux man-pages 6.03 (roff)                  various free (verbatim, GPL, BSD)
debian-reference-en    Debian Reference (HTML)                      GPL-2+
openjdk-17-doc         Java SE 17 API documentation (HTML)          GPL-2 with Classpath exception
rust-doc               Rust std library docs and books (HTML)       MIT or Apache-2.0
python-pandas-doc      pandas manual (HTML)                         BSD-3-clause
nodejs-doc             Node.js 18 API docs (HTML)                   MIT
sqlite3-doc            SQLite documentation (HTML)                  public domain
python-scipy-doc       SciPy manual (HTML)                          BSD-3-clause
gimp-help-en           GIMP user manual (HTML)                      GFDL-1.2 (1)
libstdc++-12-doc       GNU C++ library manual and API docs (HTML)   GPL-3 with GCC exception, GFDL-1.3 (1)
=====================  ===========================================  ======================

(1) These two packages carry no copyright file of their own (it ships with
``gimp-help-common`` and ``gcc-12-base``); the licences named are those of
their Debian source packages.

Measured (issue 14): 710,618 of these sentences (a seeded sample of the
distinct ones not in the large set) make the ``xlarge`` set with the large
set's 289,382 texts.
"""
from __future__ import annotations

import gzip
import html
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

DOC_PACKAGES = ("linux-doc-6.1", "python3.11-doc", "python-django-doc", "postgresql-doc-15", "git-doc",
                "perl-doc", "manpages", "manpages-dev", "debian-reference-en", "openjdk-17-doc",
                "rust-doc", "python-pandas-doc", "nodejs-doc", "sqlite3-doc", "python-scipy-doc",
                "gimp-help-en", "libstdc++-12-doc")

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_PLAIN_WORD = re.compile(r"^[A-Za-z][a-z]+[,.;:]?$")
_RULE = re.compile(r"[=\-~^*#+`:.]{3,}")


def sentences(paragraph: str, min_words: int = 5, max_words: int = 80) -> Iterator[str]:
    """Sentences of one paragraph of prose that read like prose (at least four plain words)."""
    paragraph = re.sub(r"\s+", " ", paragraph).strip()
    for s in _SPLIT.split(paragraph):
        s = s.strip()
        words = s.split()
        if (min_words <= len(words) <= max_words and 25 <= len(s) <= 500
                and sum(bool(_PLAIN_WORD.match(w)) for w in words) >= 4):
            yield s


def rst_paragraphs(text: str) -> Iterator[str]:
    """Unindented paragraphs of reStructuredText / AsciiDoc (indented blocks are code or
    directives' bodies and are skipped, as are titles' underlines and tables)."""
    par: list[str] = []
    for line in text.splitlines():
        st = line.strip()
        if (not st or line.startswith((" ", "\t")) or _RULE.fullmatch(st)
                or st.startswith((".. ", "::", "|", "+-", "#"))):
            if par:
                yield " ".join(par)
                par = []
            continue
        par.append(st)
    if par:
        yield " ".join(par)


def clean_rst(text: str) -> str:
    text = re.sub(r":[a-z:]+:`([^`<]*)(<[^>]*>)?`", r"\1", text)
    text = re.sub(r"`+([^`]*)`+_?", r"\1", text)
    return text.replace("**", "").replace("\\", "")


def html_paragraphs(text: str) -> Iterator[str]:
    """Text blocks of an HTML page, without scripts, styles and preformatted code."""
    text = re.sub(r"(?is)<(script|style|pre|code)[^>]*>.*?</\1>", " ", text)
    text = re.sub(r"(?i)</?(p|div|li|dd|dt|h\d|td|tr|br|table|section)[^>]*>", "\n\n", text)
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    yield from re.split(r"\n\s*\n", text)


def pod_paragraphs(text: str) -> Iterator[str]:
    """Ordinary POD paragraphs (commands and indented verbatim blocks are skipped)."""
    for p in re.split(r"\n\s*\n", text):
        if not p.startswith(("=", " ", "\t")):
            yield re.sub(r"[A-Z]<+\s*([^<>]*?)\s*>+", r"\1", p)


_ROFF_BREAK = re.compile(r"\.(PP|P|LP|SH|SS|TP|IP|HP|sp|br|EX|nf|RS|RE)\b")


def roff_paragraphs(text: str) -> Iterator[str]:
    """Text between paragraph macros of a man page, font escapes removed."""
    par: list[str] = []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            if _ROFF_BREAK.match(line) and par:
                yield re.sub(r"\\f[BIRP]|\\\(..|\\[-&e]", "", " ".join(par))
                par = []
            continue
        par.append(line)
    if par:
        yield " ".join(par)


def _read(path: Path) -> str:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", "replace")


def _from(files: Iterable[Path], paragraphs: Callable[[str], Iterable[str]],
          clean: Callable[[str], str] = lambda s: s) -> Iterator[str]:
    for f in files:
        for p in paragraphs(_read(f)):
            yield from sentences(clean(p))


def package_sentences(package: str, root: Path) -> Iterator[str]:
    """Sentences of one unpacked documentation package (``root`` holds its ``usr/``)."""
    if package == "linux-doc-6.1":
        docs = root / "usr/share/doc/linux-doc-6.1/Documentation"
        files = sorted(docs.rglob("*.rst.gz")) + sorted(docs.rglob("*.txt.gz"))
        return _from(files, rst_paragraphs, clean_rst)
    if package == "git-doc":
        return _from(sorted(root.rglob("*.txt")), rst_paragraphs, clean_rst)
    if package == "perl-doc":
        return _from(sorted(root.rglob("*.pod")), pod_paragraphs)
    if package in ("manpages", "manpages-dev"):
        return _from(sorted(root.rglob("*.gz")), roff_paragraphs)
    return _from(sorted(root.rglob("*.html")), html_paragraphs)


def documentation_sentences(package_dir: Callable[[str], Path]) -> list[str]:
    """Distinct sentences of every package in :data:`DOC_PACKAGES`, in package order.

    ``package_dir(name)`` returns the directory a package was unpacked into.
    """
    seen: dict[str, None] = {}
    for package in DOC_PACKAGES:
        for s in package_sentences(package, package_dir(package)):
            seen.setdefault(s, None)
    return list(seen)
