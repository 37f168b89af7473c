"""Configuration: the TOML file read into frozen, checked sections (every error names its key path)."""
