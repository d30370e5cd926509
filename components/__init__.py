"""Thin KFP components, one per step: build the step's config from the inputs, call `run`, log the outputs.

Each one is a lightweight Python component: KFP ships the function's source and runs it inside the image
named in `images.refs` (`install_kfp_package=False`: the images already hold `kfp`, so no pip install at run
time and no network needed). No logic lives here: every knob is a field of the step's config dataclass with the
same name, every path is a KFP artifact, and there are no defaults (they live once, on the dataclass; the
pipeline reads them at compile time). Imports go inside the body because only the body travels.
"""

from components.convert import convert
from components.deploy import deploy
from components.evaluate import evaluate
from components.merge import merge
from components.mine import mine
from components.register import register
from components.score import score
from components.split import split
from components.train import train

COMPONENTS = {
    "convert": convert,
    "split": split,
    "mine": mine,
    "score": score,
    "train": train,
    "evaluate": evaluate,
    "merge": merge,
    "register": register,
    "deploy": deploy,
}

__all__ = [
    "COMPONENTS",
    "convert",
    "deploy",
    "evaluate",
    "merge",
    "mine",
    "register",
    "score",
    "split",
    "train",
]
