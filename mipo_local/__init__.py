"""mipo-local: private, on-device personalization of small language models.

The library is headless: nothing here imports Textual. The CLI (`mipo_local.cli`) and the terminal app
(`tui`) are thin layers over it.
"""

__version__ = "0.1.0"
