"""The keys every training stage has: `TrainConfig`, subclassed next to each stage (`class Config(TrainConfig)`).

One pydantic model, help written once in `Field(description=...)`, unknown keys refused (`StrictConfig`). A stage
overrides the defaults that suit it (`out`, `lr`, `max_len`...), adds its own keys, and lists in `unsupported`
the inherited keys it cannot honour: setting one is an error naming the key, never a silent no-op.
`instar train STAGE --set key=value` and `[train.<stage>]` tables in an `instar run` config both land here.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from instar.config import StrictConfig


class TrainConfig(StrictConfig):
    """Keys every stage has. Stages subclass it and override defaults (e.g. `out`, `lr`)."""

    model: str = Field("scratch", description="Input model: a previous stage's run directory, a Hugging Face model "
                       "directory, 'embedded-smollm2', or (pretrain only) 'scratch' with `preset`.")
    out: str = Field("runs/train", description="Run directory: model/, checkpoint/, summary.json.")
    max_steps: int = Field(200, ge=1, description="Training steps.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch (per process under torchrun).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per step (summed into one update).")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")
    warmup: int = Field(10, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices (not norms/biases).")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global grad norm (0 = off).")
    seed: int = Field(0, description="Seeds init, data order and sampling.")
    max_len: int = Field(256, ge=8, description="Tokens per training sequence.")
    eval_every: int = Field(50, ge=0, description="Held-out eval every N steps (0 = only start and end).")
    eval_batches: int = Field(8, ge=1, description="At most this many val batches per eval.")
    save_every: int = Field(50, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    log_every: int = Field(10, ge=1, description="Step line every N steps (metrics are stored every step).")
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto = bf16 autocast where supported "
                                                   "(CPUs with AVX512-BF16 or AMX, CUDA; fp32 on MPS).")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto = cuda, else mps (Apple), "
                                                          "else cpu.")
    compile: bool = Field(False, description="torch.compile the model (first step costs 20-40 s on CPU; "
                          "SFT's length buckets change the shape every step and recompile: 4x slower measured).")
    lora: bool = Field(False, description="Train LoRA adapters instead of all weights; merged into model/.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    sample_tokens: int = Field(48, ge=1, description="Max new tokens for the report prompts' answers (and the "
                               "external chat prompts' replies, `train/yardsticks.py`).")
    external_eval: bool = Field(False, description="At start and end, also score the hand-written external "
                                "arithmetic (instar/evalsets; ~10 s each on the tiny preset); `instar run` turns it "
                                "on for SFT and GRPO.")

    unsupported: ClassVar[dict[str, str]] = {}  # inherited key -> why this stage cannot honour it

    def recorded(self) -> dict:
        """The settings a run records (summary.json, its run row): every key but the unsupported ones, so the
        record is itself a valid config for `instar train STAGE --config`."""
        return self.model_dump(exclude=set(self.unsupported))

    @model_validator(mode="after")
    def _honoured(self):
        stage = type(self).__module__.rsplit(".", 1)[-1]
        for key in sorted(set(self.unsupported) & self.model_fields_set):
            raise ValueError(f"{stage} does not use {key} ({self.unsupported[key]})")
        return self
