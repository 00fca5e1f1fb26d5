"""Every knob an operator can turn is a Settings field, and every field is documented in
the README (named in backticks, with its default and meaning next to it)."""

from __future__ import annotations

from pathlib import Path

from settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_settings_field_is_named_in_the_readme() -> None:
    missing = [name for name in Settings.model_fields if f"`{name}`" not in README]
    assert not missing, f"settings not documented in README.md: {missing}"
