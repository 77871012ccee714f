"""Instruction data (`data.regime = "chat"`): conversations, with loss on the assistant's tokens only.

Goyal et al. 2026 (sec. 3.3, stage 2) heal a retrofitted model on OpenAssistant conversations; the retrofit
peers found the answer-only loss to matter (docs/design.md, "Retrofit peers' lessons"). A record is
OASST-style: `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}` (a local JSONL
file or a hub dataset with that column), or OpenAssistant's own message-tree rows (`OpenAssistant/oasst1`:
`oasst_threads`). An HF
tokenizer with a chat template renders the conversation as the model was tuned to read it; each assistant
turn's text after the template's generation prompt (its content and end-of-turn markup) is the target.
Other tokenizers use `User: ...` / `Assistant: ...` lines, each answer ending with EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from titan_mem.data.config import DataConfig
from titan_mem.data.packing import Row
from titan_mem.data.record_files import load_records
from titan_mem.errors import DataError

ROLES = ("system", "user", "assistant")
_PLAIN_ROLE = {"system": "System", "user": "User", "assistant": "Assistant"}


def conversation(record: Any, where: str) -> list[dict[str, str]]:
    """The checked `messages` of one record: known roles, text contents, at least one assistant turn that
    follows another message."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a 'messages' list of {{role, content}} (OASST-style)")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a text content")
    if messages[0]["role"] == "assistant" or not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: needs an assistant turn after a user or system message")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _template_segments(messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[str, bool]]:
    """(text, is target) pieces whose concatenation is the template's rendering of the conversation."""
    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
            pieces = [(head, False)]
        else:
            pieces = []
        full = tokenizer.apply_chat_template(messages[: i + 1])
        pieces.append((full, m["role"] == "assistant"))
        for text, target in pieces:
            if not text.startswith(done):
                raise DataError(
                    f"{tokenizer.name}: the chat template renders turn {i} apart from the turns before it "
                    "(not a prefix), so the answer tokens cannot be located"
                )
            out.append((text[len(done) :], target))
            done = text
    return [(t, target) for t, target in out if t]


def chat_row(messages: list[dict[str, str]], tokenizer: Any) -> Row:
    """One conversation as a training row: loss on each assistant turn's tokens (and its end marker)."""
    tokens: list[int] = []
    targets: list[bool] = []
    if getattr(tokenizer, "chat_template", None):
        for text, target in _template_segments(messages, tokenizer):
            ids = tokenizer.encode_special(text)
            tokens += ids
            targets += [target] * len(ids)
        return Row(tuple(tokens), tuple(targets))
    tokens = tokenizer.prefix_ids()
    targets = [False] * len(tokens)
    for m in messages:
        if m["role"] == "assistant":
            prompt = tokenizer.encode("Assistant:")
            answer = tokenizer.encode(" " + m["content"].strip()) + [tokenizer.eos_id]
            tokens += prompt + answer
            targets += [False] * len(prompt) + [True] * len(answer)
        else:
            ids = tokenizer.encode(f"{_PLAIN_ROLE[m['role']]}: {m['content'].strip()}\n")
            tokens += ids
            targets += [False] * len(ids)
    return Row(tuple(tokens), tuple(targets))


def chat_rows(conversations: Sequence[list[dict[str, str]]], tokenizer: Any) -> list[Row]:
    return [chat_row(c, tokenizer) for c in conversations]


def load_conversations(cfg: DataConfig, world: Any = None) -> list[list[dict[str, str]]]:
    """The chat regime's conversations: a record source's `messages`, or, on the synthetic world, its QA
    pairs about `data.synthetic_population` as one-turn chats (instruction data about known people)."""
    first = cfg.max_examples or None
    if world is not None:
        qa = world.qa_examples(cfg.population())[:first]
        return [
            [{"role": "user", "content": e.question}, {"role": "assistant", "content": e.answers[0]}]
            for e in qa
        ]
    records = list(load_records(cfg.source, config=cfg.hf_config, split=cfg.split))  # small: in memory
    if records and isinstance(records[0], dict) and "message_id" in records[0]:
        return oasst_threads(records, cfg.source)[:first]
    out = []
    for i, record in enumerate(records):
        out.append(conversation(record, f"{cfg.source}: record {i + 1}"))
        if first is not None and len(out) == first:
            break
    return out


def oasst_threads(messages: Sequence[dict[str, Any]], where: str) -> list[list[dict[str, str]]]:
    """OpenAssistant's message trees (`OpenAssistant/oasst1` rows: message_id, parent_id, role prompter |
    assistant, text, rank) as conversations: one per top-ranked assistant reply (rank 0, or a reply no one
    ranked), the path from the tree's root to it; in the rows' order."""
    by_id = {}
    for i, m in enumerate(messages):
        if not {"message_id", "parent_id", "role", "text"} <= set(m) or m["role"] not in (
            "prompter",
            "assistant",
        ):
            raise DataError(f"{where}: row {i + 1}: not an OASST message (message_id, parent_id, role, text)")
        by_id[m["message_id"]] = m
    out = []
    for m in messages:
        if m["role"] != "assistant" or m.get("rank") not in (0, None):
            continue
        path, node = [], m
        while node is not None:
            path.append(
                {"role": "user" if node["role"] == "prompter" else "assistant", "content": node["text"]}
            )
            node = by_id.get(node["parent_id"]) if node["parent_id"] is not None else None
        out.append(path[::-1])
    return out
