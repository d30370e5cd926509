"""ms-swift's message-list rows (Qwen3-VL-Embedding / -Reranker data) as canonical rows.

    {"messages": [{"role": "user", "content": "<image>q"}], "images": ["a.jpg"],
     "positive_messages": [[{"role": "user", "content": "<image>p"}]], "positive_images": [["b.jpg"]],
     "negative_messages": [[{"role": "user", "content": "<image><image>n"}]], "negative_images": [["c.jpg", "d.jpg"]]}
    -> {"query": "<image>q", "response": "<image>p", "rejected_response": ["<image><image>n"],
        "images": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]}

Each message list holds one text (one non-system message; multi-turn lists are refused); a system message of
`messages` becomes the row's `instruction`. The images are put in tag order: the query's, then each
positive's, then each negative's (`embedtune.data`). `embedtune convert` reads these rows (`--format messages`,
or detected from the keys `messages` + `positive_messages`) and then checks the images as for any row.
"""

from __future__ import annotations

from embedtune.data import _short, canonical, check_row


def _message_text(messages, field: str) -> tuple[str | None, str | None, list[str]]:
    """A message list -> (its one non-system message's content, the system content or None, problems)."""
    if not isinstance(messages, list) or not messages:
        return None, None, [f"{field}: must be a non-empty list of messages, got {_short(messages)}"]
    system, texts, problems = None, [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            problems.append(f'{field}[{i}]: a message is {{"role": ..., "content": text}}, got {_short(m)}')
        elif m.get("role") == "system":
            system = m["content"]
        else:
            texts.append(m["content"])
    if not problems and len(texts) != 1:
        problems.append(
            f"{field}: {len(texts)} non-system messages; one per text (multi-turn is not supported)"
        )
    return (texts[0] if texts else None), system, problems


def _nested(value, n: int, field: str) -> tuple[list[list], list[str]]:
    """`positive_images` / `negative_images`: a list of lists, one per message list (absent: none)."""
    if value is None:
        return [[] for _ in range(n)], []
    if not isinstance(value, list) or len(value) != n or not all(isinstance(v, list) for v in value):
        return [], [f"{field}: must be {n} lists of images, one per message list, got {_short(value)}"]
    return value, []


def from_messages(row: dict, loss_type: str = ""):
    """ms-swift's message-list rows (Qwen3-VL-Embedding / -Reranker): `messages` (the query; a system message
    is its instruction), `positive_messages` / `negative_messages` (lists of message lists), `images` (the
    query's), `positive_images` / `negative_images` (one list per message list). One row per positive."""
    query, system, problems = _message_text(row.get("messages"), "messages")
    lists = {}
    for field in ("positive_messages", "negative_messages"):
        value = row.get(field, [] if field == "negative_messages" else None)
        if not isinstance(value, list) or (field == "positive_messages" and not value):
            problems.append(
                f"{field}: must be a {'non-empty ' if field[0] == 'p' else ''}list of message lists"
            )
            value = []
        texts = []
        for i, messages in enumerate(value):
            text, _, bad = _message_text(messages, f"{field}[{i}]")
            problems += bad
            texts.append(text)
        lists[field] = texts
    pos_images, bad = _nested(row.get("positive_images"), len(lists["positive_messages"]), "positive_images")
    neg_images, bad2 = _nested(row.get("negative_images"), len(lists["negative_messages"]), "negative_images")
    problems += bad + bad2
    if problems:
        return [], problems, 0
    out = []
    negatives = lists["negative_messages"]
    for text, images in zip(lists["positive_messages"], pos_images, strict=True):
        r = {"query": query, "response": text, "rejected_response": negatives, "label": row.get("label"),
             "images": [*(row.get("images") or []), *images, *(x for n in neg_images for x in n)] or None,
             "instruction": system}  # fmt: skip
        r = {k: v for k, v in r.items() if v is not None}
        if problems := check_row(r, loss_type):
            return [], problems, 0
        out.append(canonical(r))
    return out, [], 0
