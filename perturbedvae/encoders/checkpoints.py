"""Loading a transformers checkpoint without its load-report table, warning only about what matters.

transformers prints a table of every checkpoint key it did not use. A Geneformer or BERT checkpoint
saved with its masked-LM head always has unused `cls.*` keys, so a user saw that table on every load
and learned to ignore it, including the one line that matters: weights of the encoder that are *not*
in the checkpoint and start random. This loads quietly and warns about exactly those.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def load_quietly(model_class: Any, checkpoint: str | Path, **kwargs: Any) -> Any:
    """`model_class.from_pretrained(checkpoint, **kwargs)` without the load report; warns about missing weights."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(str(checkpoint), output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(previous)
    missing = [str(key) for key in info.get("missing_keys", [])] + [str(key) for key in info.get("mismatched_keys", [])]
    if missing:
        warnings.warn(
            f"{checkpoint}: {len(missing)} weight(s) of {type(model).__name__} are not in the checkpoint (or have another "
            f"shape) and start random ({', '.join(missing[:5])}); is this the checkpoint of this encoder?",
            UserWarning,
            stacklevel=2,
        )
    return model
