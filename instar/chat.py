"""`instar chat [RUN]`: talk to any stage's model in the terminal.

    instar chat                      # the latest run's final model
    instar chat runs/sft             # a run directory, a Hugging Face directory, or embedded-smollm2
    echo "What is 7 + 5?" | instar chat runs/grpo

Each turn renders the whole conversation with the model's ChatML template (`tokens.render_chat`) and
samples a reply with `sampling.generate` (KV cache). `/reset` forgets the conversation; `/exit` or end of input
quits. Deliberately simple: no streaming (tiny models answer in well under a second), and when the
conversation outgrows the model's context the oldest turns are dropped.
"""

from __future__ import annotations

from typing import TextIO


def chat(source: str, stream: TextIO, console, *, max_new_tokens: int = 200, temperature: float = 0.7,
         system: str | None = None, seed: int = 0) -> int:
    """Read user lines from `stream` until `/exit` or EOF, print replies on `console`; return turns answered."""
    from instar.train.models import load_model
    from instar.train.sampling import generate
    from instar.train.tokens import render_chat

    model, tok = load_model(source)
    model.eval()
    context = getattr(model.config, "max_position_embeddings", 2048)
    max_new_tokens = min(max_new_tokens, context // 2)  # leave the conversation at least half the context
    interactive = stream.isatty()
    console.print(f"[dim]chatting with {source} — /reset forgets, /exit quits[/]")
    history: list[dict] = []
    turns = 0
    while True:
        if interactive:
            console.print("[bold cyan]you>[/] ", end="")
        line = stream.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = []
            console.print("[dim](conversation forgotten)[/]")
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids, _ = render_chat(tok, messages, add_generation_prompt=True)
        while len(ids) + max_new_tokens > context and len(history) > 1:  # drop the oldest exchange
            history = history[2:]
            messages = ([{"role": "system", "content": system}] if system else []) + history
            ids, _ = render_chat(tok, messages, add_generation_prompt=True)
        ids = ids[-(context - max_new_tokens):]
        reply = generate(model, tok, [ids], max_new_tokens=max_new_tokens, temperature=temperature,
                         seed=seed + turns).texts[0].strip()
        history.append({"role": "assistant", "content": reply or "…"})
        console.print(f"[bold green]model>[/] {reply}", highlight=False)
        turns += 1
    return turns
