"""Training helpers shared by stages and experiments (thin wrappers over TRL/PEFT)."""
