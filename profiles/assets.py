"""Where bundled assets live, and how a name becomes a path: the one module that knows.

``profiles/bundled/<hardware>_<model>.emuprof.zst`` hold the bundled profiles,
``profiles/models/<name>/`` the bundled model directories (config.json and a
tokenizer, no weights). Everything that takes "a file or a bundled name"
(the gateway's config, ``emugate emulate``, capture, validate, tests) resolves
it here.
"""
from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
MODELS_DIR = Path(__file__).resolve().parent / "models"


def resolve_profile(name_or_path: str | Path) -> Path:
    """Map a path or a bundled profile name (file stem under profiles/bundled) to a file.

    Raises:
        FileNotFoundError: neither an existing file nor a bundled name; the
            message lists the bundled names.
    """
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    for cand in (BUNDLED_DIR / f"{name_or_path}.emuprof.zst", BUNDLED_DIR / str(name_or_path)):
        if cand.is_file():
            return cand
    names = sorted(x.name.removesuffix(".emuprof.zst") for x in BUNDLED_DIR.glob("*.emuprof.zst"))
    raise FileNotFoundError(
        f"profile {str(name_or_path)!r} is neither a file nor a bundled profile; bundled: {names}"
    )


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """Map a path or a bundled model name (folder under profiles/models) to a directory.

    Raises:
        FileNotFoundError: neither exists; the message lists the bundled names.
    """
    p = Path(name_or_path).expanduser()
    if (p / "config.json").is_file():
        return p.resolve()
    cand = MODELS_DIR / str(name_or_path)
    if (cand / "config.json").is_file():
        return cand
    names = sorted(x.name for x in MODELS_DIR.iterdir() if (x / "config.json").is_file())
    raise FileNotFoundError(
        f"model {str(name_or_path)!r} is neither a directory with config.json nor a bundled model; bundled: {names}"
    )
