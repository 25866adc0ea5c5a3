"""The continual-learning methods, one subpackage per family; their catalog of names is ``catalog.py``."""
