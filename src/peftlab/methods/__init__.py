"""The built-in PEFT methods, one package per family; each method registers itself with :mod:`peftlab.registry`.

* ``lora/``: LoRA (``lora.py``: config, factory, registration), its layer adapters (``layers.py``)
  and DoRA (``dora.py``, chosen with ``LoraConfig(use_dora=True)``).
* ``adalora/``: AdaLoRA's SVD-form adapters (``adalora.py``), its rank budget and regulariser
  (``budget.py``) and the Trainer callback that calls them (``callback.py``).
* ``lycoris/``: LoHa and LoKr on their shared base (``base.py``).
* ``ia3/``, ``bottleneck/``, ``selective/``: one method each.
* ``prompt/``: prompt tuning, prefix tuning and P-tuning on their shared config and virtual-token
  module (``base.py``) and input rewriting (``inputs.py``).

A family's ``__init__`` imports the modules that register its methods and exposes their public
names; the registry imports the family packages on first lookup.
"""
