"""Embedded training data: a seeded generated corpus of text with numbers and arithmetic."""
