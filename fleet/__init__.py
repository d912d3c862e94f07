"""The operator's side: send prompts, sign and pack bundles, serve and roll out updates."""

__version__ = "0.1.0"
