"""The Ollama backend driven by the real `ollama` client over HTTP, against a loopback server started here.

The Ollama server cannot be installed on these machines (docs/measured-facts.md), so `FakeOllama` implements the three
endpoints the client uses (`GET /api/version`, `GET /api/tags`, `POST /api/chat` non-streaming with `format`)
in the standard library. It answers either with the embedded SmolLM2 GGUF through llama-cpp-python (the
real path, schema from `format` applied as a grammar) or from a script, for the failure modes: model not
found (404), busy (503) then success, a dropped connection, connection refused, empty content,
schema-violating content, truncation (done_reason "length") and a prompt that fills num_ctx.
"""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from instar.errors import InstarError
from instar.generate.backends import LlamaCppBackend, OllamaBackend, embedded_model_path
from instar.generate.pipeline import GenerateConfig, generate

MODEL = "smollm2:135m"
STORY = ("Tom had a small red boat. Every morning he sailed it on the pond near his house, and the ducks "
         "swam beside him. One day the wind blew hard, but Tom held the sail and came home safe and happy.")


def chat_reply(content, done_reason="stop", prompt_eval_count=40, eval_count=30):
    return 200, {"model": MODEL, "created_at": "2026-01-01T00:00:00Z", "done": True, "done_reason": done_reason,
                 "message": {"role": "assistant", "content": content}, "prompt_eval_count": prompt_eval_count,
                 "eval_count": eval_count}


class FakeOllama:
    """A loopback Ollama: `script` is a list of replies to /api/chat, each (status, json) or "drop",
    or a function of the request body."""

    def __init__(self, script, models=(MODEL,)):
        self.requests, self.script, self.models = [], script, list(models)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/api/version":
                    return self.send(200, {"version": "0.12.0"})
                if self.path == "/api/tags":
                    return self.send(200, {"models": [{"name": m, "model": m, "size": 1, "digest": "0"}
                                                      for m in outer.models]})
                self.send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                if body["model"] not in outer.models:
                    return self.send(404, {"error": f"model '{body['model']}' not found"})
                reply = outer.script(body) if callable(outer.script) else outer.script[len(outer.requests) - 1]
                if reply == "drop":  # close the connection without an answer
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send(*reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script, **kw):
        servers.append(FakeOllama(script, **kw))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def backend(*servers, **kw):
    kw = {"retries": 2, "backoff": 0.01, "timeout": 30, **kw}
    return OllamaBackend(MODEL, [s.url for s in servers], **kw)


def reasons(store):
    return [r[0] for r in store.db.execute("select reason from failures order by id")]


def test_real_model_behind_the_ollama_api(store, serve):
    llama = LlamaCppBackend(embedded_model_path(), name="embedded")

    def answer(body):  # what Ollama does: the chat template, `format` as a grammar, options as sampling settings
        o = body["options"]
        gen = llama.chat(body["messages"], schema=body["format"], temperature=o["temperature"], seed=o["seed"],
                         max_tokens=o["num_predict"])
        return chat_reply(gen.text, "length" if gen.finish_reason == "length" else "stop", gen.prompt_tokens,
                          gen.completion_tokens)
    server = serve(answer)
    result = generate(store, GenerateConfig(kind="instructions", count=2, max_attempts=3, max_tokens=160,
                                            concurrency=2), backend=backend(server, concurrency=2))
    assert result.attempts == len(server.requests) and result.accepted + result.rejected == result.attempts
    body = server.requests[0]
    assert body["stream"] is False
    for sent in server.requests:  # each request carries the schema its prompt describes (request or question half)
        asked = ["question", "answer"] if '"question"' in sent["messages"][-1]["content"] else ["instruction", "response"]
        assert sent["format"]["required"] == asked
    assert body["options"]["num_predict"] == 160 and body["options"]["num_ctx"] == 2048
    rows = list(store.db["records"].rows)
    assert len(rows) == result.accepted and all(r["backend"] == "ollama" and r["model"] == MODEL for r in rows)


def test_model_not_pulled_says_how_to_pull_it(store, serve):
    server = serve([chat_reply(json.dumps({"text": STORY}))], models=["llama3.2:latest"])
    with pytest.raises(InstarError, match=f"ollama pull {MODEL}"):
        generate(store, GenerateConfig(kind="corpus", count=1), backend=backend(server))
    assert server.requests == []  # found by /api/tags before any generation
    b = backend(server)  # and a 404 from /api/chat itself (model removed mid-run) says the same
    with pytest.raises(InstarError, match=f"ollama pull {MODEL}"):
        b.chat([{"role": "user", "content": "hi"}], schema=None, temperature=0, seed=0, max_tokens=8)


def test_server_not_running_says_ollama_serve(store):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = OllamaBackend(MODEL, [f"http://127.0.0.1:{port}"], retries=1, backoff=0.01, timeout=5)
    with pytest.raises(InstarError, match="ollama serve"):
        generate(store, GenerateConfig(kind="corpus", count=1), backend=dead)
    with pytest.raises(InstarError, match="ollama serve"):
        dead.chat([{"role": "user", "content": "hi"}], schema=None, temperature=0, seed=0, max_tokens=8)


def test_busy_and_dropped_connections_are_retried(store, serve):
    server = serve([(503, {"error": "server busy"}), "drop", chat_reply(json.dumps({"text": STORY}))])
    result = generate(store, GenerateConfig(kind="corpus", count=1), backend=backend(server))
    assert result.accepted == 1 and len(server.requests) == 3


def test_busy_after_all_retries_is_a_failure_not_a_crash(store, serve):
    server = serve(lambda body: (503, {"error": "server busy"}))
    result = generate(store, GenerateConfig(kind="corpus", count=1, max_attempts=1), backend=backend(server))
    assert result.accepted == 0 and reasons(store) == ["backend: server busy (503)"]
    assert len(server.requests) == 3  # one try + two retries


def test_silent_failures_are_counted_never_stored(store, serve):
    server = serve([chat_reply(""),  # a thinking model that spent its budget thinking
                    chat_reply(json.dumps({"story": STORY})),  # ignores the schema
                    chat_reply("Here is a story: " + STORY),  # not JSON at all
                    chat_reply(json.dumps({"text": STORY})[:60], done_reason="length"),
                    chat_reply(json.dumps({"text": STORY}), prompt_eval_count=2048),  # prompt cut to num_ctx
                    chat_reply(json.dumps({"text": STORY}))])
    result = generate(store, GenerateConfig(kind="corpus", count=1), backend=backend(server))
    assert result.accepted == 1 and store.count("text") == 1
    assert reasons(store) == ["empty content", "schema mismatch: text", "invalid json", "truncated (max tokens)",
                              "truncated (prompt fills the context window)"]


OTHER_STORIES = [
    "A little bird named Pip could not fly yet. Her mother showed her how to flap her wings every day, and "
    "after many tries Pip rose above the tall green trees and sang with joy.",
    "Mia planted three seeds in a pot by the window. She gave them water and sun, and after two weeks small "
    "leaves came up. Mia drew a picture of them for her grandmother.",
    "The old train went up the hill very slowly. The children on board counted the cows in the fields, "
    "and when the train reached the top they all cheered and waved at the farmer.",
    "Sam lost his blue kite in a big tree. His sister brought a long stick and a ladder, and together they "
    "got it down. Then they flew it over the beach until the sun went down.",
]


def test_several_hosts_share_the_load(store, serve):
    stories = iter(OTHER_STORIES)
    lock = threading.Lock()

    def answer(body):
        with lock:
            return chat_reply(json.dumps({"text": next(stories)}))
    a, b = serve(answer), serve(answer)
    result = generate(store, GenerateConfig(kind="corpus", count=4, concurrency=2), backend=backend(a, b, concurrency=2))
    assert result.accepted == 4 and len(a.requests) == len(b.requests) == 2
