"""Readers of the manuals that Debian packages install, as running prose: HTML, POD, AsciiDoc and roff.

Each reader is a `TextFiles` (glob patterns under a root, one document per file) that names the package to
install when its files are missing and takes ``exclude`` patterns (indexes, search pages, changelogs). What
they keep is the text a person reads: headings, paragraphs, lists, tables and code blocks; navigation,
scripts, styles, inline SVG diagrams and markup go.
"""

from __future__ import annotations

import fnmatch
import re
from html.parser import HTMLParser
from pathlib import Path

from datamodules.errors import MissingSourceError
from datamodules.sources import TextFiles, _glob


class PackageDocs(TextFiles):
    """Text files a Debian package installs, one document per file.

    Args:
        paths: Glob patterns (``**`` matches any depth), relative to ``root`` unless absolute.
        root: Directory the patterns and the documents' paths are relative to.
        package: The Debian package that installs them (named in the error when they are missing).
        exclude: Glob patterns of paths (relative to ``root``) to leave out, e.g. ``genindex*``.
        name: Name of this source in manifests and logs (default: the class name in snake_case).
        max_documents: Keep only the first this many documents, in sorted file order (all when None).
        max_bytes: Skip files larger than this many bytes (after decompression).
    """

    def __init__(
        self,
        paths: list[str],
        root: str = ".",
        package: str | None = None,
        exclude: list[str] | None = None,
        name: str | None = None,
        max_documents: int | None = None,
        max_bytes: int = 1_000_000,
    ):
        super().__init__(paths, root=root, name=name, max_documents=max_documents, max_bytes=max_bytes)
        self.package = package
        self.exclude = list(exclude or [])

    def files(self) -> list[Path]:
        files = [p for p in _glob(self.paths, self.root)
                 if not any(fnmatch.fnmatch(self.relpath(p), pattern) for pattern in self.exclude)]
        if not files:
            install = f"Install them with `apt-get install {self.package}` (or `make prepare-full`), or set `root`."
            raise MissingSourceError(
                f"source '{self.name}': no files match {self.paths} under {self.root}. "
                + (install if self.package else "Check `paths` and `root` in the corpus config.")
            )
        return files


# --------------------------------------------------------------------------------------------- HTML

_BLOCK = {"p", "div", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table",
          "tr", "blockquote", "section", "article", "br", "hr", "figure", "caption", "title"}
_DROPPED = {"script", "style", "svg", "nav", "head", "noscript", "button", "form", "select", "math"}
_VOID = {"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr", "source"}


class _TextExtractor(HTMLParser):
    """Text of an HTML page: blocks on their own lines, whitespace collapsed outside ``<pre>``; elements
    whose tag is dropped or whose id/class/role matches ``skip`` are left out with everything inside."""

    def __init__(self, skip: re.Pattern | None, content: re.Pattern | None):
        super().__init__(convert_charrefs=True)
        self.skip, self.content = skip, content
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, dropped, content) per open element
        self.parts: list[str] = []
        self.content_parts: list[str] = []
        self.pre = 0

    def _dropped(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def _in_content(self) -> bool:
        return bool(self.stack) and self.stack[-1][2]

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        names = " ".join(v for k, v in attrs.items() if k in ("id", "class", "role") and v)
        dropped = self._dropped() or tag in _DROPPED or bool(self.skip and names and self.skip.search(names))
        content = self._in_content() or bool(self.content and names and self.content.search(names))
        if tag in _BLOCK:
            self._emit("\n")
        if tag == "pre":
            self.pre += 1
        if tag in _VOID:
            return
        self.stack.append((tag, dropped, content))

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        for i in range(len(self.stack) - 1, -1, -1):  # tolerate unclosed elements: close up to the match
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _BLOCK:
            self._emit("\n")

    def handle_data(self, data):
        self._emit(data if self.pre else re.sub(r"\s+", " ", data))

    def _emit(self, text: str) -> None:
        if self._dropped():
            return
        self.parts.append(text)
        if self._in_content():
            self.content_parts.append(text)

    def text(self) -> str:
        parts = self.content_parts if self.content and self.content_parts else self.parts
        lines = [line.rstrip() for line in "".join(parts).split("\n")]
        text = "\n".join(line if line.strip() else "" for line in lines)
        return re.sub(r"\n{3,}", "\n\n", text).strip()


def html_to_text(html: str, skip: str | None = None, content: str | None = None) -> str:
    """The readable text of an HTML page (see :class:`HtmlText`)."""
    parser = _TextExtractor(re.compile(skip) if skip else None, re.compile(content) if content else None)
    parser.feed(html)
    parser.close()
    return parser.text()


class HtmlText(PackageDocs):
    """HTML manuals (Sphinx, DocBook, Publican pages) as text, one document per page.

    Args:
        paths: Glob patterns of the pages, relative to ``root`` unless absolute.
        root: Directory the patterns and the documents' paths are relative to.
        package: The Debian package that installs them (named in the error when they are missing).
        exclude: Glob patterns of paths (relative to ``root``) to leave out.
        content: A regex over an element's id, class and role: only text inside matching elements is kept
            (the page's main column), or the whole page where none matches.
        skip: A regex over an element's id, class and role: matching elements are left out (navigation
            bars, tables of contents, footers).
        name: Name of this source in manifests and logs (default: ``html_text``).
        max_documents: Keep only the first this many documents, in sorted file order (all when None).
        max_bytes: Skip files larger than this many bytes (after decompression).
    """

    def __init__(
        self,
        paths: list[str],
        root: str = ".",
        package: str | None = None,
        exclude: list[str] | None = None,
        content: str | None = None,
        skip: str | None = r"(^|\s)(nav\w*|toc|related|footer|header|breadcrumbs?|sphinxsidebar|headerlink)(\s|$)",
        name: str | None = None,
        max_documents: int | None = None,
        max_bytes: int = 1_000_000,
    ):
        super().__init__(paths, root=root, package=package, exclude=exclude, name=name,
                         max_documents=max_documents, max_bytes=max_bytes)
        self.content = content
        self.skip = skip

    def clean(self, text: str) -> str:
        return html_to_text(text, self.skip, self.content)


# --------------------------------------------------------------------------------------------- POD

_POD_DROP_BLOCK = re.compile(r"^=begin\b.*?^=end\b[^\n]*\n?", re.M | re.S)
_POD_FOR = re.compile(r"^=for\b[^\n]*\n(?:[^\n]+\n)*", re.M)
_POD_COMMAND = re.compile(r"^=(head\d|item)\s*(.*)$", re.M)
_POD_OTHER = re.compile(r"^=(over|back|pod|cut|encoding|begin|end)\b[^\n]*\n?", re.M)
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def _pod_code(m: re.Match) -> str:
    code, body = m.group(1), m.group(2)
    if code in "XZ":
        return ""
    if code == "E":
        if body in _POD_ESCAPES:
            return _POD_ESCAPES[body]
        try:
            return chr(int(body, 0))  # E<0xEF>, E<0351>, E<233>
        except ValueError:
            return body
    if code == "L":
        text = body.split("|", 1)[0] if "|" in body else body
        return text.replace('"', "")
    return body


def clean_pod(text: str) -> str:
    """Perl's POD as plain text: headings and items keep their text, formatting codes (``B<>``, ``C<< >>``,
    ``L<text|target>``, ``E<lt>``) their content; ``=begin``/``=for`` blocks for other formatters go."""
    text = _POD_DROP_BLOCK.sub("", text)
    text = _POD_FOR.sub("", text)
    text = _POD_COMMAND.sub(lambda m: m.group(2), text)
    text = _POD_OTHER.sub("", text)
    double = re.compile(r"([BCEFILSXZ])<{2,}\s+(.*?)\s+>{2,}", re.S)
    single = re.compile(r"([BCEFILSXZ])<([^<>]*)>")
    text = double.sub(_pod_code, text)
    for _ in range(4):  # nested codes, innermost first
        text, n = single.subn(_pod_code, text)
        if not n:
            break
    return re.sub(r"\n{3,}", "\n\n", text).strip()


class PodText(PackageDocs):
    """Perl's documentation (``perl-doc``: ``perlfunc``, ``perlre``, the tutorials...) from its ``.pod`` files.

    Args:
        paths: Glob patterns of the ``.pod`` files, relative to ``root`` unless absolute.
        root: Directory the patterns and the documents' paths are relative to.
        package: The Debian package that installs them (named in the error when they are missing).
        exclude: Glob patterns of paths (relative to ``root``) to leave out (e.g. ``perl*delta.pod``).
        name: Name of this source in manifests and logs (default: ``pod_text``).
        max_documents: Keep only the first this many documents, in sorted file order (all when None).
        max_bytes: Skip files larger than this many bytes (after decompression).
    """

    def clean(self, text: str) -> str:
        return clean_pod(text)


# --------------------------------------------------------------------------------------------- AsciiDoc

_ADOC_DROP_LINE = re.compile(
    r"^(\[\[[^\]]*\]\]|\[[\w\s,=\"'.#-]*\]|:[\w-]+:.*|ifn?def::.*|endif::.*|include::.*|//.*|"
    r"(-{4,}|\.{4,}|={4,}|\+{4,}|\*{4,}|_{4,}|~{4,}|\^{4,})|'{3,})$"
)
_ADOC_UNDERLINE = re.compile(r"^([=\-~^+])\1+$")


def clean_asciidoc(text: str) -> str:
    """AsciiDoc (git's manual pages and guides) as plain text: anchors, attributes, conditionals, includes,
    block delimiters and heading underlines go; ``linkgit:git-log[1]`` becomes ``git-log(1)``."""
    out = []
    for line in text.split("\n"):
        stripped = line.strip()
        if _ADOC_DROP_LINE.match(stripped) or (out and _ADOC_UNDERLINE.match(stripped)
                                               and abs(len(stripped) - len(out[-1].strip())) <= 2):
            continue
        line = re.sub(r"linkgit:([\w-]+)\[(\d)\]", r"\1(\2)", line)
        line = re.sub(r"\b(?:link|https?):(\S+?)\[([^\]]*)\]", lambda m: m.group(2) or m.group(1), line)
        line = re.sub(r"^(=+)\s+(.*?)(\s+=+)?$", r"\2", line)  # "== Title ==" headings
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


class AsciidocText(PackageDocs):
    """AsciiDoc sources (``git-doc``: git's manual pages, user manual and guides as ``.txt``).

    Args:
        paths: Glob patterns of the ``.txt`` files, relative to ``root`` unless absolute.
        root: Directory the patterns and the documents' paths are relative to.
        package: The Debian package that installs them (named in the error when they are missing).
        exclude: Glob patterns of paths (relative to ``root``) to leave out.
        name: Name of this source in manifests and logs (default: ``asciidoc_text``).
        max_documents: Keep only the first this many documents, in sorted file order (all when None).
        max_bytes: Skip files larger than this many bytes (after decompression).
    """

    def clean(self, text: str) -> str:
        return clean_asciidoc(text)


# --------------------------------------------------------------------------------------------- roff (man pages)

_ROFF_CHARS = {"em": "—", "en": "–", "aq": "'", "dq": '"', "bu": "•", "co": "©", "rs": "\\", "lq": "“", "rq": "”",
               "oq": "‘", "cq": "’", "ha": "^", "ti": "~", "mu": "×", "<=": "≤", ">=": "≥", "!=": "≠", "->": "→",
               "hy": "-", "ga": "`", "rg": "®", "de": "°", "+-": "±", "sc": "§", "tm": "™", "at": "@", "sh": "#"}
_ROFF_ESCAPE = re.compile(r"\\(f(?:\[[^\]]*\]|\(..|.)|\((..)|\[([^\]]*)\]|\*(?:\[[^\]]*\]|\(..|.)|[-e~ 0&|^c%:])")
_ROFF_ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI"}
_ROFF_TEXT = {"B", "I", "SM", "SB", "SH", "SS", "TP", "IP", "TQ", "UR", "MT"}
_TH = re.compile(r"^\.TH\s+(.*)$", re.M)


def _roff_escape(m: re.Match) -> str:
    body = m.group(1)
    if body.startswith(("f", "*")):
        return ""
    name = m.group(2) or m.group(3)
    if name is not None:
        return _ROFF_CHARS.get(name, "")
    return {"-": "-", "e": "\\", "~": " ", " ": " "}.get(body, "")


def clean_roff(text: str) -> str:
    """A man page's roff source as plain text: section headings and highlighted words keep their text
    (``.BR open (2)`` becomes ``open(2)``), filled text is joined into paragraphs (``.nf`` blocks keep their
    lines), escapes become the characters they stand for, every other request (layout, fonts, comments) goes."""
    out: list[str] = []
    fill, joinable, table_format = True, False, False

    def add(words: str, filled: bool) -> None:
        nonlocal joinable
        if filled and joinable and out:
            out[-1] += " " + words
        else:
            out.append(words)
        joinable = filled

    for line in text.split("\n"):
        if line.startswith(("'\\\"", ".\\\"", '\\"')):
            continue
        if table_format:  # tbl's format lines, up to the one ending in "."
            table_format = not line.rstrip().endswith(".")
            continue
        if not line.startswith((".", "'")):
            if not line.strip():
                add("", False)
            else:
                add(line.replace("\t", " ") if not fill else line.strip(), fill)
            continue
        m = re.match(r"^[.'](\S+)\s*(.*)$", line)
        if not m:
            continue
        macro, rest = m.group(1), m.group(2)
        if macro == "TS":
            table_format, fill = True, False
        elif macro in ("nf", "EX", "TE"):
            fill = macro == "TE"
            joinable = False
        elif macro in ("fi", "EE"):
            fill = True
        elif macro in _ROFF_ALTERNATING:
            add("".join(re.findall(r'"[^"]*"|\S+', rest)).replace('"', ""), fill)
        elif macro in ("SH", "SS"):
            out.extend(["", rest.replace('"', "").strip()])
            joinable = False
        elif macro in ("TP", "IP", "TQ"):
            tag = (re.findall(r'"[^"]*"|\S+', rest) or [""])[0].replace('"', "")
            out.append("")
            joinable = False
            if tag:
                add(tag, False)
        elif macro in _ROFF_TEXT:
            add(rest.replace('"', "").strip(), fill)
        elif macro in ("PP", "LP", "P", "sp", "br"):
            out.append("" if macro != "br" else out.pop() if out else "")
            joinable = False
    text = _ROFF_ESCAPE.sub(_roff_escape, "\n".join(out))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


class ManPages(PackageDocs):
    """Manual pages (roff) as text, one document per page; redirect pages (``.so``) and pages of other
    projects (their ``.TH`` line does not match ``project``) are skipped.

    Args:
        paths: Glob patterns of the pages (``man2/*.2.gz``...), relative to ``root`` unless absolute.
        root: The man page tree (``/usr/share/man``).
        package: The Debian package that installs them (named in the error when they are missing).
        exclude: Glob patterns of paths (relative to ``root``) to leave out.
        project: A regex the page's ``.TH`` line must match (``Linux man-pages``: the pages of the
            ``manpages`` and ``manpages-dev`` packages, whatever else installed pages here); any page when None.
        name: Name of this source in manifests and logs (default: ``man_pages``).
        max_documents: Keep only the first this many documents, in sorted file order (all when None).
        max_bytes: Skip files larger than this many bytes (after decompression).
    """

    def __init__(
        self,
        paths: list[str],
        root: str = "/usr/share/man",
        package: str | None = None,
        exclude: list[str] | None = None,
        project: str | None = "Linux man-pages",
        name: str | None = None,
        max_documents: int | None = None,
        max_bytes: int = 1_000_000,
    ):
        super().__init__(paths, root=root, package=package, exclude=exclude, name=name,
                         max_documents=max_documents, max_bytes=max_bytes)
        self.project = project

    def is_generated(self, text: str) -> bool:  # not generated, but not this project's page or a redirect
        th = _TH.search(text)
        redirect = re.search(r"^\.so\s", text, re.M) and len(text) < 2000
        return bool(redirect) or bool(self.project and not (th and re.search(self.project, th.group(1))))

    def clean(self, text: str) -> str:
        return clean_roff(text)
