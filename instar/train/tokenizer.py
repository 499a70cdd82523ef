"""Stage 0's tokenizer: byte-level BPE trained with `tokenizers` on the stored corpus, saved as a fast tokenizer.

    tok = train_tokenizer(texts, vocab_size=1024)     # a transformers PreTrainedTokenizerFast
    tok.save_pretrained("runs/pretrain/tokenizer")

Special tokens: `<|endoftext|>` (document separator in packed pretraining), `<|im_start|>` / `<|im_end|>`
(ChatML turns; `<|im_end|>` is the eos, as in SmolLM2-Instruct, so chat generation stops at the end of a turn
everywhere, llama.cpp included) and `<|pad|>`, a pad token distinct from eos: padding can never be confused
with the stop token the model must learn. The chat template is ChatML with no default system prompt.
Byte-level means any string round-trips, so no `<unk>` is needed.

Numbers are split into single digits before BPE (the `Digits(individual_digits=True)` pre-tokenizer, then
GPT-2's ByteLevel regex: the same sequence as SmolLM2's tokenizer, which llama.cpp knows as `smollm`, so the
GGUF export keeps tokenising the same way). Without it, merges learned from a small corpus give some numbers
one token and others two or three ("1998" vs "19" "9" "8"), and a model must learn each number's arithmetic
separately; with it, "23 + 48 = 71" is ten digit and symbol tokens whose columns line up. Deliberately simple:
no normaliser; stage 1 trains it on the corpus and a sample of the stored conversations
(`pretrain.tokenizer_texts`).
"""

from __future__ import annotations

from typing import Iterable

ENDOFTEXT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]  # ids 0..3 in a freshly trained tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer on `texts`; return it as a transformers fast tokenizer.

    The vocabulary may come out smaller than `vocab_size` on a small corpus (no merge appears twice)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # 256 byte symbols + 4 specials is the floor; below it BPE cannot even cover the alphabet.
    vocab_size = max(int(vocab_size), 256 + len(SPECIAL_TOKENS))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=IM_END, bos_token=None, pad_token=PAD,
                                  unk_token=None, additional_special_tokens=[ENDOFTEXT, IM_START],
                                  model_max_length=1 << 20)
    tok.chat_template = CHATML_TEMPLATE
    return tok
