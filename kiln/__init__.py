"""Kiln: from raw text to your own chatbot."""

__version__ = "0.1.0"
