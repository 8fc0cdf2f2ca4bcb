"""CFLOW-AD (Gudovskiy et al., WACV 2022): conditional normalizing flows over multi-scale patch features.

``flow``: the decoders (FrEIA training form, folded inference form); ``model``: front end and scoring head;
``fit``: training with early stopping and held-out thresholds; ``bundle``: the saved detector.
"""
