"""The README's config reference names every run-config key (so the docs cannot drift)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from giblet_ds.config import RunConfig

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            out += _keys(type(default), f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def test_every_config_key_is_documented() -> None:
    section = README.split("## Run config reference", 1)[1].split("\n## ", 1)[0]
    missing = [key for key in _keys(RunConfig) if f"`{key.rsplit('.', 1)[-1]}`" not in section
               and f"`{key}`" not in section]  # fmt: skip
    assert missing == []
    assert len(_keys(RunConfig)) == 70  # the walk reached every nested section
