"""Named job presets (TOML). `qprep --job NAME` loads `NAME.toml` from here."""
