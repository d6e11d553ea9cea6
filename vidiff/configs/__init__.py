"""Experiment configs shipped with the package, each a ``get_config()`` file named on the command line.

``vidiff train --config world_tiny`` (or the file's path, ``vidiff/configs/world_tiny.py``, or a copy of it
anywhere) loads one through :func:`vidiff.train.config.load_config`. ``world_tiny``: the tiny VAE then the tiny
DiT on the built-in captioned world (the bundled model's recipe); ``real_tiny``: that VAE on real mp4s. Each
docstring gives its commands and measured run times.
"""
