"""The OpenAI-compatible backend driven by the real `openai` client over HTTP, against a loopback server started here.

`FakeOpenAI` implements what the client uses of llama-server / vLLM / SGLang / LM Studio in the standard
library: `GET /v1/models` and non-streaming `POST /v1/chat/completions` with `response_format` json_schema.
It answers with the embedded SmolLM2 GGUF (the schema applied as a grammar, as llama-server does) or from a
script, for the failure modes: busy (503) then success, busy for good, a dropped connection, connection
refused, a model the server does not serve, a key it refuses, empty content, schema-violating content,
truncation (finish_reason "length"), a refusal and a prompt over the context (HTTP 400).
"""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from instar.cli import app
from instar.errors import InputError
from instar.generate.backends import LlamaCppBackend, OpenAIBackend, embedded_model_path
from instar.generate.pipeline import GenerateConfig, generate
from test_generate_ollama import OTHER_STORIES

MODEL = "smollm2-135m"
STORY = ("Tom had a small red boat. Every morning he sailed it on the pond near his house, and the ducks "
         "swam beside him. One day the wind blew hard, but Tom held the sail and came home safe and happy.")


def completion(content, finish_reason="stop", prompt_tokens=40, completion_tokens=30, refusal=None):
    return 200, {"id": "c1", "object": "chat.completion", "created": 0, "model": MODEL,
                 "choices": [{"index": 0, "finish_reason": finish_reason,
                              "message": {"role": "assistant", "content": content, "refusal": refusal}}],
                 "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}}


class FakeOpenAI:
    """A loopback OpenAI-compatible server: `script` is a list of replies to /v1/chat/completions, each
    (status, json) or "drop", or a function of the request body. `key`: the bearer token it requires."""

    def __init__(self, script, models=(MODEL,), key=None):
        self.requests, self.headers, self.script, self.models, self.key = [], [], script, list(models), key
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

            def authorised(self):
                if outer.key and self.headers.get("Authorization") != f"Bearer {outer.key}":
                    self.send(401, {"error": {"message": "invalid api key", "type": "authentication_error"}})
                    return False
                return True

            def do_GET(self):
                if not self.authorised():
                    return
                if self.path == "/v1/models":
                    return self.send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                                       "owned_by": "me"} for m in outer.models]})
                self.send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self.authorised():
                    return
                outer.requests.append(body)
                outer.headers.append(self.headers.get("Authorization"))
                if body["model"] not in outer.models:
                    return self.send(404, {"error": {"message": f"model {body['model']} not found"}})
                reply = outer.script(body) if callable(outer.script) else outer.script[len(outer.requests) - 1]
                if reply == "drop":  # close the connection without an answer
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send(*reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script, **kw):
        servers.append(FakeOpenAI(script, **kw))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    for var in OpenAIBackend.KEY_VARS:
        monkeypatch.delenv(var, raising=False)


def backend(*servers, **kw):
    kw = {"retries": 2, "timeout": 30, **kw}
    return OpenAIBackend(MODEL, [s.url for s in servers], **kw)


def reasons(store):
    return [r[0] for r in store.db.execute("select reason from failures order by id")]


def dead_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_real_model_behind_the_openai_api(store, serve):
    llama = LlamaCppBackend(embedded_model_path(), name="embedded", slots=2)

    def answer(body):  # what llama-server does: chat template, response_format's schema as a grammar
        gen = llama.chat(body["messages"], schema=body["response_format"]["json_schema"]["schema"],
                         temperature=body["temperature"], seed=body["seed"], max_tokens=body["max_tokens"])
        return completion(gen.text, gen.finish_reason, gen.prompt_tokens, gen.completion_tokens)
    server = serve(answer)
    result = generate(store, GenerateConfig(kind="instructions", count=2, max_attempts=3, max_tokens=160,
                                            concurrency=2), backend=backend(server, concurrency=2))
    assert result.attempts == len(server.requests) and result.accepted + result.rejected == result.attempts
    body = server.requests[0]
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema"
    for sent in server.requests:  # each request carries the schema its prompt describes (request or question half)
        asked = ["question", "answer"] if '"question"' in sent["messages"][-1]["content"] else ["instruction", "response"]
        assert sent["response_format"]["json_schema"]["schema"]["required"] == asked
    assert body["max_tokens"] == 160 and body["model"] == MODEL and "seed" in body
    rows = list(store.db["records"].rows)
    assert len(rows) == result.accepted and all(r["backend"] == "openai" and r["model"] == MODEL for r in rows)


def test_api_key_comes_from_the_environment(store, serve, monkeypatch):
    server = serve([completion(json.dumps({"text": STORY}))], key="sk-local")
    with pytest.raises(InputError, match="INSTAR_OPENAI_API_KEY or OPENAI_API_KEY"):
        backend(server).check()  # no key set: refused at the start, before any generation
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
    result = generate(store, GenerateConfig(kind="corpus", count=1), backend=backend(server))
    assert result.accepted == 1 and server.headers[0] == "Bearer sk-local"
    monkeypatch.setenv("INSTAR_OPENAI_API_KEY", "sk-other")  # instar's own variable wins
    assert backend(server).clients[0].api_key == "sk-other"


def test_model_not_served_and_dead_server_are_one_line_errors(store, serve):
    server = serve([completion(json.dumps({"text": STORY}))], models=["qwen2.5-7b"])
    with pytest.raises(InputError, match="not served at .*it serves: qwen2.5-7b"):
        generate(store, GenerateConfig(kind="corpus", count=1), backend=backend(server))
    assert server.requests == [] and store.count() == 0
    dead = OpenAIBackend(MODEL, [dead_url()], retries=1, timeout=5)
    with pytest.raises(InputError, match="cannot reach an OpenAI-compatible server"):
        generate(store, GenerateConfig(kind="corpus", count=1), backend=dead)
    with pytest.raises(InputError, match="cannot reach"):  # and a server that dies mid-run
        dead.chat([{"role": "user", "content": "hi"}], schema=None, temperature=0, seed=0, max_tokens=8)


def test_busy_and_dropped_connections_are_retried(store, serve):
    server = serve([(503, {"error": {"message": "busy"}}), "drop", completion(json.dumps({"text": STORY}))])
    result = generate(store, GenerateConfig(kind="corpus", count=1), backend=backend(server))
    assert result.accepted == 1 and len(server.requests) == 3


def test_busy_after_all_retries_is_a_failure_not_a_crash(store, serve):
    server = serve(lambda body: (503, {"error": {"message": "busy"}}))
    result = generate(store, GenerateConfig(kind="corpus", count=1, max_attempts=1), backend=backend(server))
    assert result.accepted == 0 and reasons(store) == ["backend: server error 503"]
    assert len(server.requests) == 3  # one try + two retries


def test_silent_failures_are_counted_never_stored(store, serve):
    server = serve([completion(""),  # a thinking model that spent its budget thinking
                    completion(json.dumps({"story": STORY})),  # ignores the schema
                    completion("Here is a story: " + STORY),  # not JSON at all
                    completion(json.dumps({"text": STORY})[:60], finish_reason="length"),
                    completion(None, refusal="I cannot write that."),
                    (400, {"error": {"message": "the request exceeds the available context size"}}),
                    completion(json.dumps({"text": STORY}))])
    result = generate(store, GenerateConfig(kind="corpus", count=1), backend=backend(server))
    assert result.accepted == 1 and store.count("text") == 1
    assert reasons(store) == ["empty content", "schema mismatch: text", "invalid json", "truncated (max tokens)",
                              "stopped: refusal", "truncated (prompt fills the context window)"]


def test_several_hosts_share_the_load(store, serve):
    stories = iter(OTHER_STORIES)
    lock = threading.Lock()

    def answer(body):
        with lock:
            return completion(json.dumps({"text": next(stories)}))
    a, b = serve(answer), serve(answer)
    result = generate(store, GenerateConfig(kind="corpus", count=4, concurrency=2),
                      backend=backend(a, b, concurrency=2))
    assert result.accepted == 4 and len(a.requests) == len(b.requests) == 2


def test_cli_backend_openai_and_a_dead_host_exit_2(serve, tmp_path, monkeypatch, capsys):
    server = serve([completion(json.dumps({"text": STORY}))])
    db = str(tmp_path / "x.db")
    code = app(["generate", "corpus", "-n", "1", "--backend", "openai", "--host", server.url, "--model", MODEL,
                "--db", db], standalone_mode=False)
    assert code in (None, 0) and "1/1 stored" in capsys.readouterr().out.replace("\n", " ")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "instar.cli", "generate", "corpus", "-n", "2", "--backend", "openai",
                           "--host", dead_url(), "--model", MODEL, "--db", db, "--set", "retries=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "cannot reach" in proc.stderr
    assert "Traceback" not in proc.stderr
