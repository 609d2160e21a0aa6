"""Integrations with training frameworks (DeepSpeed)."""
