"""Experiment configs: ``base.py`` holds the STGCN++ recipe; every other file overrides only what differs."""
