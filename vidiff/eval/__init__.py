"""Evaluating trained models: prompt adherence on the captioned world (``adherence``), prompting-mode evidence (``modes``).

``vidiff eval adherence`` / ``vidiff eval modes`` (``command``) run them from the shell.
"""
