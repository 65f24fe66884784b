"""The built-in memory kinds, one package each: `document`, `local`, `adapter`.

Each package holds `config` (its options, defined once), `module` (serving), `train`,
`eval`, and an `__init__` that registers the kind. No kind imports another kind.
"""
