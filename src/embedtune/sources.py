"""Mixed-source training: the per-source knobs, read once from their JSON text.

Rows carry a `source` (the input file or dataset they came from; convert sets it, any row may name its own).
Three knobs act on it (NV-Embed stage 2, FlagEmbedding's `same_dataset_within_batch` and `*no_in_batch_neg`
folders, sentence-transformers' ROUND_ROBIN / PROPORTIONAL samplers):

- `batch_sampling`: `mixed` (every source shuffled together, as before), `round_robin` or `proportional`:
  every training batch holds rows of one source (`batching.LengthGroupedSampler`), so in-batch negatives
  come from the same task. round_robin takes one batch of each source in turn and stops when the smallest
  runs out (each source trains equally often); proportional shuffles every source's batches together (each
  row once per epoch, a source as often as it has batches). Rows left over after a source's last full batch
  wait for the next epoch's shuffle.
- `source_instructions`: `{"source": "instruction"}`, the query instruction of that source's rows (a row's own
  `instruction` wins, then this, then `query_instruction`).
- `source_in_batch_negatives`: `{"source": false}`: that source's batches score each query against its own
  positive and hard negatives only (infonce_use_batch off for them; its rows need rejected_response).
  Needs one source per batch (round_robin or proportional).
"""

from __future__ import annotations

import json

from embedtune.errors import EmbedtuneError

BATCH_SAMPLINGS = ("mixed", "round_robin", "proportional")
NO_SOURCE = ""  # the source of a row that names none


def _mapping(text: str, knob: str, kind: type) -> dict:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise EmbedtuneError(f"{knob}: not JSON ({e})") from None
    if not isinstance(value, dict) or not all(isinstance(v, kind) for v in value.values()):
        raise EmbedtuneError(
            f"{knob}: expected a JSON object of source -> {kind.__name__}, got {text[:80]!r}"
        )
    return value


def instructions(text: str) -> dict[str, str]:
    """`source_instructions` -> {source: instruction}."""
    return _mapping(text, "source_instructions", str)


def without_in_batch(text: str) -> frozenset[str]:
    """`source_in_batch_negatives` -> the sources whose batches score no in-batch negatives."""
    return frozenset(s for s, on in _mapping(text, "source_in_batch_negatives", bool).items() if not on)


def source_of(row: dict) -> str:
    return row.get("source") or NO_SOURCE


def query_instruction(row: dict, by_source: dict[str, str]) -> str | None:
    """The row's own query instruction, else its source's; None: the model's `query_instruction`."""
    own = row.get("instruction")
    return own if own is not None else by_source.get(source_of(row))


def check_knobs(cfg, loss_knobs: dict) -> None:
    """A TrainConfig's per-source knobs parse, and make sense together and with the loss (`loss_knobs`, the
    resolved keyword arguments of its loss); one line each."""
    batch_sampling = cfg.batch_sampling
    if instructions(cfg.source_instructions) and cfg.task_type != "embedding":
        raise EmbedtuneError("source_instructions: query instructions are for task_type embedding")
    off = without_in_batch(cfg.source_in_batch_negatives)
    if off and "use_batch" not in loss_knobs:
        raise EmbedtuneError(
            "source_in_batch_negatives: the loss scores no in-batch negatives (infonce, distill_kl)"
        )
    if off and batch_sampling == "mixed":
        raise EmbedtuneError(
            "source_in_batch_negatives: needs batch_sampling round_robin or proportional (one source per batch)"
        )


def check_rows(rows: list[dict], in_batch_text: str, path: str) -> None:
    """Rows of a source without in-batch negatives need their own (`FILE lines ...: rejected_response`)."""
    from embedtune.errors import DataError

    off = without_in_batch(in_batch_text)
    bare = [
        str(r.get("_line", i + 1))
        for i, r in enumerate(rows)
        if source_of(r) in off and not r.get("rejected_response")
    ]
    if bare:
        shown = ", ".join(bare[:20]) + (f", ... ({len(bare)} in all)" if len(bare) > 20 else "")
        raise DataError(f"{path} lines {shown}: rejected_response: the row's source scores no in-batch negatives "
                        "(source_in_batch_negatives): it needs its own")  # fmt: skip
