"""Generated help text: every component input (and pipeline parameter) is described in the compiled YAML.

KFP reads a function's `Args:` docstring section into the compiled spec, and the Kubeflow UI shows it next to
each parameter of the run form. Writing that section by hand copies the help that already sits on each config
field (`config.py`, read by `config.field_help`), and copies drift. `documented` writes it instead: the
function's own docstring stays the summary, and each parameter gets its config field's help, or the text
given here for inputs that are not config fields (artifacts named differently, launch knobs). A parameter
with neither is an error at import time, so nothing reaches the UI undocumented.

KFP ships a lightweight component's source without its decorators, so this runs only at compile time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from kfp.dsl.types import type_annotations


def args_section(names, helps: dict[str, str], where: str, title: str = "Args") -> str:
    """A Google-style `Args:` section, one line per name; raises naming any name without help."""
    missing = [n for n in names if not helps.get(n)]
    if missing:
        raise TypeError(f"{where}: no help text for {', '.join(missing)} (add a comment on the config field)")
    return f"{title}:\n" + "\n".join(f"    {n}: {' '.join(helps[n].split())}" for n in names)


def documented(*helps: dict[str, str], **docs: str) -> Callable:
    """Decorator: append an `Args:` section to the function's docstring. Each parameter's text is `docs[name]`
    when given, else the first of `helps` (field name -> help, e.g. `field_help(TrainConfig)`) that has it."""

    def wrap(func):
        merged: dict[str, str] = {}
        for table in reversed(helps):
            merged.update(table)
        merged.update(docs)
        params = inspect.signature(func).parameters
        outputs = [
            n for n, p in params.items() if type_annotations.is_artifact_wrapped_in_Output(p.annotation)
        ]
        inputs = [n for n in params if n not in outputs]
        doc = f"{inspect.getdoc(func) or ''}\n\n{args_section(inputs, merged, func.__name__)}\n"
        if outputs:  # KFP reads output artifacts' descriptions from a Returns: section
            doc += f"\n{args_section(outputs, merged, func.__name__, 'Returns')}\n"
        func.__doc__ = doc
        return func

    return wrap
