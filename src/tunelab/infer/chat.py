"""`tunelab chat`: an interactive conversation with a causal LM or a run, each reply streamed."""

from __future__ import annotations

from tunelab.infer.generate import generate
from tunelab.infer.sampling import Sampling


def chat(model, tokenizer, sampling: Sampling, read=None, write=print) -> None:
    """An interactive conversation: each reply streams as it is generated; the history is kept.

    /reset forgets the history, /system TEXT sets a system prompt, /exit (or end of input) leaves.
    """
    read = read or input  # looked up now, so that a test (or a wrapper) can replace it
    history: list[dict] = []
    system: list[dict] = []
    write("chat: /reset forgets the conversation, /system TEXT sets a system prompt, /exit leaves")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("")
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
            continue
        if line.startswith("/system"):
            system = [{"role": "system", "content": line.removeprefix("/system").strip()}]
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        write("model> ", end="")
        reply = generate(model, tokenizer, system + history, sampling, stream=True)
        history.append({"role": "assistant", "content": reply})
