"""The operator's side: send prompts to devices (signing, updates and rollouts come later)."""

__version__ = "0.1.0"
