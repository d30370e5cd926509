"""embedtune: fine-tune embedding models and rerankers as a Kubeflow pipeline."""

__version__ = "0.1.0"
