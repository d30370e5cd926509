"""LoRA on any model embedtune trains: PEFT's LoRA (or DoRA) around the wrapper's inner Hugging Face model.

An embedder's adapter is a FEATURE_EXTRACTION adapter, a generative reranker's a CAUSAL_LM one, a classifier
reranker's a SEQ_CLS one whose head (`HEAD_MODULES`) trains in full and is saved with the adapter.
"""

from __future__ import annotations

from embedtune.modeling import ClassifierReranker, Embedder, Reranker

HEAD_MODULES = (
    "classifier",
    "score",
    "head",
)  # a classification head's modules (BERT / decoders / ModernBERT)


def add_lora(
    model: Embedder | Reranker, rank: int, alpha: int, dropout: float, target: str, use_dora: bool = False,
    exclude: str | None = None,
) -> None:  # fmt: skip
    """Wrap the model's inner HF model in a PEFT LoRA (in place; `use_dora`: PEFT's DoRA). `target`: all-linear
    or module names; `exclude`: a regex of module names left without LoRA (a frozen vision tower, `visual`). A
    classifier reranker's head is trained in full (`modules_to_save`: saved with the adapter)."""
    from peft import LoraConfig, get_peft_model

    kind = "FEATURE_EXTRACTION" if isinstance(model, Embedder) else "CAUSAL_LM"
    head = []
    if isinstance(model, ClassifierReranker):
        kind = "SEQ_CLS"
        head = [name for name, _ in model.inner.named_children() if name in HEAD_MODULES]
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target if target == "all-linear" else [t.strip() for t in target.split(",")],
        task_type=kind,
        modules_to_save=head or None,
        use_dora=use_dora,
        exclude_modules=exclude,
    )
    model.set_inner(get_peft_model(model.inner, lora))
