"""Key names: one vocabulary for selecting keys and modules, and one name-mapping pipeline.

- ``select``: selectors (globs, ``re:``, module types, callables) resolved against a model's
  modules and parameters or a list of keys: ``skip=``, ``freeze``, ``param_groups`` rules,
  ``allow_missing``, ``plan.find``.
- ``remap``: the user's renaming rules (dict, ``(regex, replacement)`` list, callable).
- ``prefix``: the automatic ``(strip, add)`` prefix rewrite, and hints that name one.
- ``peft``: the names of a model wrapped by ``peft.get_peft_model``.
- ``ties``: one model tensor under several keys.
- ``mapping``: the pipeline loading, ``restore_optimizer`` and ``match`` all map names with.
"""
