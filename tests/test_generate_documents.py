"""Steering generation: topics, the user's documents (grounded questions), document import, and bad input.

A scripted fake backend stands in for the teacher; the documents are written here (a PDF is built by hand,
then encrypted with pypdf), so every reader, the grounding check and each bad-input path runs offline.
"""

import json
import re

import pytest

from instar.datasets.documents import cut, find_documents, read_passages, read_text
from instar.errors import InputError
from instar.generate import prompts as P
from instar.generate.backends import FakeBackend
from instar.generate.pipeline import GenerateConfig, generate
from test_cli_data import one_line_error, run

RHINE = ("The Rhine is a river in Europe. It is 1,230 km long and flows from the Swiss Alps to the North Sea. "
         "Barges carry coal and grain along it, and the city of Basel stands on its banks.")
BEES = ("Honey bees live in colonies of up to 60,000 workers. The queen lays the eggs, and the workers collect "
        "nectar from flowers and turn it into honey inside the hive.")


def pdf_bytes(lines: list[str]) -> bytes:
    """A one-page PDF with a text layer (Helvetica), written by hand: objects, xref table, trailer."""
    content = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) '" for line in lines) + " ET"
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               "/Resources << /Font << /F1 5 0 R >> >> >>",
               f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    return out + f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()


def encrypted_pdf(path, lines):
    import io

    import pypdf

    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(pdf_bytes(lines))))
    writer.encrypt(user_password="secret", algorithm="RC4-128")
    with open(path, "wb") as f:
        writer.write(f)


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "rhine.md").write_text(f"# Rivers\n\n{RHINE.replace('Basel', '**Basel**')}\n")
    (folder / "sub" / "bees.html").write_text(f"<html><head><script>var x = 1;</script></head><body><p>{BEES}</p>"
                                              "<nav>Home | About</nav></body></html>")
    (folder / "notes.txt").write_text("Tides rise and fall twice a day because the Moon pulls on the oceans of the "
                                      "Earth, and the Sun adds a smaller pull of its own.\n")
    (folder / "report.pdf").write_bytes(pdf_bytes(["Volcanoes form where magma reaches the surface.",
                                                   "Mount Etna in Sicily erupted 200 times since 1500."]))
    (folder / ".hidden.txt").write_text("never read " * 20)
    (folder / "image.png").write_bytes(b"\x89PNG")
    return folder


def test_every_format_reads_as_clean_text(docs):
    files = find_documents(docs)
    assert [f.name for f in files] == ["notes.txt", "report.pdf", "rhine.md", "bees.html"]
    texts = {f.name: read_text(f) for f in files}
    assert texts["rhine.md"].startswith("Rivers\n\nThe Rhine") and "**" not in texts["rhine.md"]
    assert "var x" not in texts["bees.html"] and "Home | About" not in texts["bees.html"]
    assert "Mount Etna in Sicily erupted 200 times since 1500." in texts["report.pdf"].replace("\n", " ")
    long = "\n\n".join(f"Paragraph {i}. " + "word " * 60 for i in range(10))
    pieces = cut(long, 1000)
    assert len(pieces) > 1 and all(len(p) <= 1000 for p in pieces) and all(p.startswith("Paragraph") for p in pieces)


def reply_for(messages):
    """A teacher that answers grounded for the Rhine and bee passages and invents a number for the others."""
    prompt = messages[1]["content"]
    if "Rhine" in prompt:
        return json.dumps({"question": "How long is the Rhine?", "answer": "The Rhine is 1,230 km long and "
                           "flows from the Swiss Alps to the North Sea."})
    if "bees" in prompt:
        return json.dumps({"question": "What does the passage say about bees?", "answer": "Bees make honey."})
    return json.dumps({"question": "When did it happen?", "answer": "It happened in 1999 near the coast."})


def test_grounded_questions_cite_file_and_passage_and_ungrounded_answers_fail(store, docs):
    fake = FakeBackend(reply_for)
    result = generate(store, GenerateConfig(kind="instructions", count=2, documents=str(docs), max_attempts=8),
                      backend=fake)
    prompts = [c["messages"][1]["content"] for c in fake.calls]
    # passages in turn: every file's passage is used once before any is used twice
    assert [re.search(r'document "([^"]+)"', p).group(1) for p in prompts[:4]] == [
        "notes.txt", "report.pdf", "rhine.md", "bees.html"]
    assert all(p.startswith('A passage from the document') for p in prompts)
    rows = list(store.db.execute("select data, document, topic from records"))
    assert result.accepted == 1 and len(rows) == 1  # the Rhine passage, then only duplicates of it
    data, document, topic = rows[0]
    assert document == f"{docs / 'rhine.md'}#1" and topic is None
    assert json.loads(data)["messages"][0]["content"] == "How long is the Rhine?"
    reasons = [r for (r,) in store.db.execute("select reason from failures order by id")]
    assert reasons[:4] == ["ungrounded: number not in passage", "ungrounded: number not in passage",
                           "question refers to the passage"] + reasons[3:4]


def test_topics_steer_every_prompt_and_are_stored_as_provenance(store, tmp_path):
    from test_generate_fake import doc

    topics_file = tmp_path / "topics.txt"
    topics_file.write_text("# my subjects\ntide pools\n\nsourdough starters\ntide pools\n")
    fake = FakeBackend([doc(i) for i in range(20)])
    cfg = GenerateConfig(kind="corpus", count=6, topics=["volcanoes"], topics_file=str(topics_file))
    assert generate(store, cfg, backend=fake).accepted == 6
    mine = ("volcanoes", "tide pools", "sourdough starters")
    for call in fake.calls:
        prompt = call["messages"][1]["content"]
        assert any(f"about {t} for" in prompt for t in mine) and not any(f"about {t} for" in prompt for t in P.TOPICS)
    stored = {t for (t,) in store.db.execute("select topic from records")}
    assert stored <= set(mine) and len(stored) >= 2
    default = FakeBackend([doc(i) for i in range(100, 110)])  # no topics: the built-in pool, also recorded
    generate(store, GenerateConfig(kind="corpus", count=8), backend=default)
    assert {t for (t,) in store.db.execute("select topic from records")} - set(mine) <= set(P.TOPICS)


def test_one_unreadable_file_among_many_is_a_failure_row(store, docs):
    encrypted_pdf(docs / "secret.pdf", ["Classified numbers 1 2 3 for nobody to read at all."])
    generate(store, GenerateConfig(kind="instructions", count=1, documents=str(docs), max_attempts=4),
             backend=FakeBackend(reply_for))
    bad = store.db.execute("select reason, raw from failures where reason like 'document:%'").fetchall()
    assert bad == [("document: encrypted PDF (it needs a password)", str(docs / "secret.pdf"))]


def test_data_import_cuts_documents_into_text_records(monkeypatch, capsys, tmp_path, docs):
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    db = tmp_path / "i.db"
    code, out, _ = run(monkeypatch, capsys, "data", "import", docs, "--db", db)
    assert code == 0 and "4 files read" in out and "1 unreadable files" in out and "broken.pdf" in out
    from instar.datasets.store import Store

    store = Store.open(db)
    docs_stored = {d.rsplit("#", 1)[0].rsplit("/", 1)[-1] for (d,) in store.db.execute("select document from records")}
    assert docs_stored == {"notes.txt", "report.pdf", "rhine.md", "bees.html"} and store.count("text") == 4
    assert store.db.execute("select count(*) from failures where reason like 'import: unreadable PDF%'").fetchone()[0]
    code, out, _ = run(monkeypatch, capsys, "data", "import", docs / "rhine.md", "--db", db)
    assert code == 0 and "0 inserted, 1 already stored" in out  # re-import: content-hash ids


@pytest.mark.parametrize("args, message", [
    (["generate", "instructions", "-n", "3", "--from", "{tmp}/nowhere"], "not found"),
    (["generate", "instructions", "-n", "3", "--from", "{tmp}/empty"], "no .txt, .md"),
    (["generate", "instructions", "-n", "3", "--from", "{tmp}/secret.pdf"], "encrypted PDF"),
    (["generate", "instructions", "-n", "3", "--from", "{tmp}/scan.pdf"], "without a text layer"),
    (["generate", "corpus", "-n", "3", "--topics", "{tmp}/blank.txt"], "has no topics"),
    (["generate", "corpus", "-n", "3", "--topics", "{tmp}/missing.txt"], "topics file not found"),
    (["generate", "corpus", "-n", "1", "--topics", "{tmp}/missing.txt"], "topics file not found"),  # store full
    (["data", "import", "{tmp}/empty"], "no .txt, .md"),
    (["data", "import", "{tmp}/secret.pdf"], "encrypted PDF"),
    (["data", "import", "{tmp}/nowhere.jsonl"], "file not found"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_stored_is_lost(monkeypatch, capsys, tmp_path, args, message):
    from instar.datasets.store import Store

    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("\n  \n# only a comment\n")
    encrypted_pdf(tmp_path / "secret.pdf", ["A secret line of text that nobody can read here."])
    (tmp_path / "scan.pdf").write_bytes(pdf_bytes([]))
    db = tmp_path / "keep.db"
    Store.open(db).add("text", [{"text": "A record stored before the mistake."}])
    code, _, err = run(monkeypatch, capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args], "--db", db)
    assert code == 2 and message in one_line_error(err)
    store = Store.open(db)
    assert store.count() == 1 and store.db.execute("select count(*) from failures").fetchone()[0] == 0


def test_config_mistakes_about_steering(tmp_path):
    with pytest.raises(ValueError, match="only for instructions"):
        GenerateConfig(kind="corpus", count=1, documents=str(tmp_path))
    with pytest.raises(ValueError, match="1-200 characters"):
        GenerateConfig(kind="corpus", count=1, topics=["  "])
    with pytest.raises(InputError, match="cannot read .png"):
        read_passages(tmp_path / "x.png") if (tmp_path / "x.png").write_bytes(b"x") else None


def test_run_checks_topics_and_documents_before_generating(store, tmp_path):
    from instar.pipeline_run import load_pipeline_config, top_up

    cfg = load_pipeline_config(sets=[f"data.documents={tmp_path / 'nope'}", "data.corpus=5"])
    with pytest.raises(InputError, match="not found"):
        top_up(store, cfg, None, console=None)
    assert store.count() == 0


def test_one_home_for_run_defaults_the_kind_map_and_the_embedded_model():
    import tomllib

    from instar.generate import backends, recipes
    from instar.pipeline_run import DataConfig, TeacherConfig, default_config_text, load_pipeline_config
    from instar.train import models

    default = tomllib.loads(default_config_text())
    assert "data" not in default and "teacher" not in default  # the Config defaults ARE the default run's
    cfg = load_pipeline_config()
    assert cfg.data == DataConfig() and cfg.teacher == TeacherConfig()
    assert recipes.KIND_OF == {"corpus": "text", "instructions": "messages", "preferences": "preference", "math": "math"}
    assert "embedded_gguf" not in vars(models) and callable(backends.embedded_model_path)  # one locator


@pytest.mark.parametrize("question, reason", [
    ("What is the answer to this question?", "question names no subject"),
    ("How to answer this?", "question names no subject"),
    ("A question", "question names no subject"),
    ("What is this?", "question names no subject"),
    ("What does the passage say about bees?", "question refers to the passage"),
    ("What do bees make?", None),
    ("Who is Tom?", None),
])
def test_a_question_must_name_its_subject(question, reason):
    """Questions the 135M teacher wrote about its own stories (session 11): made of question words only, they
    cannot be answered without the passage the student never sees."""
    from instar.generate.filters import grounding

    passage = "Tom keeps bees. Bees make honey in the summer."
    answer = "Bees make honey." if "bees" in question.lower() else "Tom keeps bees."
    assert grounding(question, answer, passage) == reason
