"""Checks that a converted model folder holds what its loader reads, before anything is loaded.

Each check raises :class:`FolderError` with one line naming the folder, the option it came from and what is
missing, instead of a loader's error (or a hub "Repo id" error from transformers) minutes later.
"""

from __future__ import annotations

from pathlib import Path

from edit_r1_jax.weights import CONFIG_FILE, PARAMS_FILE

__all__ = ["FolderError", "check_converted", "check_qwen_dir", "check_kontext_dir"]


class FolderError(FileNotFoundError):
    pass


def _missing(d: Path, names) -> list[str]:
    return [n for n in names if not (d / n).exists()]


def check_converted(d: str | Path, what: str, hint: str) -> Path:
    """A converted component folder: ``config.json`` and ``params.safetensors``."""
    d = Path(d)
    if not d.is_dir():
        raise FolderError(f"{what} {d}: folder not found ({hint})")
    missing = _missing(d, (CONFIG_FILE, PARAMS_FILE))
    if missing:
        raise FolderError(f"{what} {d}: missing {', '.join(missing)} ({hint})")
    return d


def check_qwen_dir(d: str | Path, what: str = "--model") -> Path:
    """A converted Qwen2.5-VL folder (python -m tools.convert_weights qwen2.5-vl): weights, config, tokenizer."""
    hint = ("not a converted Qwen2.5-VL directory? make one with: "
            "python -m tools.convert_weights qwen2.5-vl --src HF_DIR --dst DIR")
    d = check_converted(d, what, hint)
    if not (d / "tokenizer.json").exists() and _missing(d, ("vocab.json", "merges.txt")):
        raise FolderError(f"{what} {d}: missing tokenizer files (tokenizer.json, or vocab.json + merges.txt) "
                          f"({hint})")
    templates = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
    if len(_missing(d, templates)) == len(templates):
        raise FolderError(f"{what} {d}: missing the chat template (chat_template.jinja, chat_template.json or "
                          f"tokenizer_config.json) ({hint})")
    return d


def check_kontext_dir(d: str | Path, what: str = "--model", text_encoders: bool = True,
                      components: tuple[str, ...] | None = None) -> Path:
    """A converted Kontext folder (python -m tools.convert_weights kontext): transformer, vae, and (when the
    instructions are encoded on the fly) both text encoders with their tokenizers. ``components`` names the
    sub-folders to check instead (e.g. only the text encoders, for the text cache builder)."""
    hint = ("not a converted Kontext directory? make one with: "
            "python -m tools.convert_weights kontext --src PIPELINE_DIR --dst DIR")
    d = Path(d)
    if not d.is_dir():
        raise FolderError(f"{what} {d}: folder not found ({hint})")
    parts = list(components) if components is not None else \
        ["transformer", "vae"] + (["text_encoder", "text_encoder_2"] if text_encoders else [])
    for part in parts:
        check_converted(d / part, f"{what} {d}: component", hint)
        if part.startswith("text_encoder") and not (d / part / "tokenizer").is_dir():
            raise FolderError(f"{what} {d}: {part}/tokenizer/ missing ({hint})")
    return d
