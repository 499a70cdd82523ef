"""The user's documents as plain text, cut into passages: for grounded questions and for pretraining text.

    files = find_documents("notes/")                     # .txt .md .html .htm .pdf, sorted; one-line errors
    passages, bad = load_passages(files, max_chars=1000)  # [Passage(file, index, text)], [(file, reason)]
    result = import_documents(store, "notes/")            # `instar data import notes/`: text records

Readers are well-kept libraries: pypdf (pure Python, no system libraries) for PDF, markdown-it-py (already
installed with rich) to turn Markdown into HTML, and Beautiful Soup with the standard-library parser to take
the text out of HTML. (markitdown does all of this too but pulls ~20 packages, pdfminer among them; docling
needs model weights.) A PDF whose text layer is empty (a scan), an encrypted PDF without an empty password,
a file that is not UTF-8: each is a `DocumentError` with the reason, which the caller turns into a one-line
error (one file given) or a failure row (one bad file among many).

Passages follow the document's own paragraphs: consecutive paragraphs are joined up to `max_chars`, a longer
paragraph is cut between sentences, a longer sentence between words. Simplification: no layout analysis,
so PDF columns, headers and footers come out in pypdf's reading order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from instar.errors import InputError

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")
PASSAGE_CHARS = 1000  # ~250 tokens: a passage, the instructions and a reply fit a 2,048-token window
DOCUMENT_CHARS = 4000  # pretraining documents cut from imported files (the teacher writes ~600-1,200)
MIN_CHARS = 80  # a shorter last piece joins the one before it; a file with less text than this is empty
_BLOCKS = ["p", "div", "li", "ul", "ol", "pre", "blockquote", "table", "tr", "section", "article", "br",
           "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "figcaption"]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class DocumentError(Exception):
    """One file could not be read as text; the message is the reason."""


@dataclass
class Passage:
    file: str
    index: int  # 0-based position in its file
    text: str

    @property
    def ref(self) -> str:
        """What provenance stores: `notes/guide.pdf#3` (passages numbered from 1)."""
        return f"{self.file}#{self.index + 1}"


def is_documents(path: str | Path, kind: str | None = None) -> bool:
    """Whether `instar data import PATH` means documents (a folder, or a .txt/.md/.html/.pdf file) rather than
    JSONL; documents become `text` records, so another --kind is an error."""
    path = Path(path)
    documents = path.is_dir() or path.suffix.lower() in SUFFIXES
    if documents and kind not in (None, "text"):
        raise InputError(f"documents ({path}) import as text records, not {kind!r}")
    return documents


def find_documents(path: str | Path) -> list[Path]:
    """The readable files at `path` (one file, or a folder searched recursively), sorted."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"not found: {path}")
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise InputError(f"cannot read {path.suffix or 'extension-less'} files ({path}): expected "
                             f"{', '.join(SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise InputError(f"no {', '.join(SUFFIXES)} files in {path}")
    return files


def read_text(path: Path) -> str:
    """The text of one document, paragraphs separated by blank lines; DocumentError if there is none."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".pdf":
            text = _pdf_text(path)
        else:
            raw = path.read_bytes().decode("utf-8-sig")
            if suffix in (".md", ".markdown"):
                from markdown_it import MarkdownIt

                text = _html_text(MarkdownIt("commonmark").render(raw))
            elif suffix in (".html", ".htm"):
                text = _html_text(raw)
            else:
                text = raw
    except UnicodeDecodeError as e:
        raise DocumentError(f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise DocumentError(f"cannot read: {e.strerror or e}") from None
    text = "\n\n".join(p for p in paragraphs(text))
    if len(text) < MIN_CHARS:
        raise DocumentError("no text" if not text else f"only {len(text)} characters of text")
    return text


def _pdf_text(path: Path) -> str:
    import pypdf
    from pypdf.errors import PdfReadError

    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):  # many PDFs are "encrypted" with an empty password
            raise DocumentError("encrypted PDF (it needs a password)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError) as e:  # pypdf's ways of saying "not a PDF I can read"
        raise DocumentError(f"unreadable PDF: {type(e).__name__}: {str(e)[:80]}") from None
    except Exception as e:  # a missing crypto library for AES, a malformed stream: still one file's problem
        if "crypt" in str(e).lower() or "AES" in str(e):
            raise DocumentError("encrypted PDF (it needs a password)") from None
        raise DocumentError(f"unreadable PDF: {type(e).__name__}: {str(e)[:80]}") from None
    if not any(p.strip() for p in pages):
        raise DocumentError("PDF without a text layer (a scan? instar does not OCR)")
    return "\n\n".join(pages)


def _html_text(html: str) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "nav", "header", "footer", "head"]):
        tag.decompose()
    for tag in soup.find_all(_BLOCKS):  # blocks end paragraphs; inline tags (a, em, code) stay inside them
        tag.append("\n\n")
    return soup.get_text()


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs with their inner whitespace collapsed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    out = []
    for block in re.split(r"\n\s*\n", text):
        block = " ".join(block.split())
        if block:
            out.append(block)
    return out


def cut(text: str, max_chars: int) -> list[str]:
    """Pieces of at most `max_chars`, cut between paragraphs, else sentences, else words."""
    units: list[tuple[str, bool]] = []  # (text, starts a paragraph)
    for para in paragraphs(text):
        first = True
        for sentence in [para] if len(para) <= max_chars else _SENTENCE_END.split(para):
            while len(sentence) > max_chars:  # one endless "sentence": cut at the last space that fits
                at = sentence.rfind(" ", 0, max_chars)
                at = at if at > 0 else max_chars
                units.append((sentence[:at], first))
                sentence, first = sentence[at:].lstrip(), False
            if sentence:
                units.append((sentence, first))
                first = False
    pieces: list[str] = []
    for unit, new_paragraph in units:
        glue = "\n\n" if new_paragraph else " "
        if pieces and len(pieces[-1]) + len(glue) + len(unit) <= max_chars:
            pieces[-1] += glue + unit
        else:
            pieces.append(unit)
    if len(pieces) > 1 and len(pieces[-1]) < MIN_CHARS:  # a short tail belongs with what comes before it
        tail = pieces.pop()
        pieces[-1] += " " + tail
    return pieces


def load_passages(files: list[Path], max_chars: int = PASSAGE_CHARS) -> tuple[list[Passage], list[tuple[str, str]]]:
    """Every file's passages in order, and (file, reason) for each file that could not be read."""
    passages: list[Passage] = []
    bad: list[tuple[str, str]] = []
    for f in files:
        try:
            text = read_text(f)
        except DocumentError as e:
            bad.append((str(f), str(e)))
            continue
        passages += [Passage(str(f), i, t) for i, t in enumerate(cut(text, max_chars))]
    return passages, bad


def read_passages(path: str | Path, max_chars: int = PASSAGE_CHARS) -> tuple[list[Passage], list[tuple[str, str]]]:
    """`find_documents` + `load_passages`; one file given that cannot be read, or no text at all, is an error."""
    files = find_documents(path)
    passages, bad = load_passages(files, max_chars)
    if not passages:
        file, reason = bad[0]
        more = f" (and {len(bad) - 1} more files)" if len(bad) > 1 else ""
        raise InputError(f"cannot use {file}: {reason}{more}")
    return passages, bad


# ---------------------------------------------------------------------------------------------------------
# `instar data import PATH` for documents

@dataclass
class DocumentImport:
    path: str
    run_id: str | None = None
    files: int = 0  # files read
    documents: int = 0  # pieces cut from them; = inserted + duplicates
    inserted: int = 0
    duplicates: int = 0
    bad: list[tuple[str, str]] | None = None  # (file, reason) for files that could not be read


def import_documents(store, path: str | Path, max_chars: int = DOCUMENT_CHARS) -> DocumentImport:
    """Pretraining `text` records cut from the documents at `path`, one transaction per file; a file that cannot
    be read is a failure row (reason `import: ...`), and nothing readable at all is a one-line error."""
    from instar.datasets.runs import finish_run, start_run
    from instar.datasets.store import Provenance

    files = find_documents(path)
    texts: dict[Path, str] = {}
    result = DocumentImport(path=str(path), bad=[])
    for f in files:  # read everything first: nothing readable at all is an error before any row is written
        try:
            texts[f] = read_text(f)
        except DocumentError as e:
            result.bad.append((str(f), str(e)))
    if not texts:
        file, reason = result.bad[0]
        raise InputError(f"cannot import {file}: {reason}" + (f" (and {len(files) - 1} more files)"
                                                               if len(files) > 1 else ""))
    result.run_id = start_run(store, kind="import", stage="import", config={"path": str(path), "kind": "text"})
    status = "failed"
    try:
        for file, reason in result.bad:
            store.add_failure(f"import: {reason}", file, kind="text", run_id=result.run_id)
        for f, text in texts.items():
            pieces = cut(text, max_chars)
            result.files += 1
            with store.writing():  # a file goes in whole or not at all
                for i, piece in enumerate(pieces):
                    added = store.add("text", [{"text": piece}], Provenance(source="import", run_id=result.run_id,
                                                                            document=f"{f}#{i + 1}"))
                    result.inserted += added.inserted
                    result.duplicates += added.duplicates
            result.documents += len(pieces)
        status = "done"
    finally:
        finish_run(store, result.run_id, status=status,
                   summary={"files": result.files, "documents": result.documents, "inserted": result.inserted,
                            "duplicates": result.duplicates, "bad_files": result.bad[:100]})
    return result
