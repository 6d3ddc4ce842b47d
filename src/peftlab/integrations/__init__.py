"""Where the ecosystem expects peft: transformers' Trainer, trl, accelerate.

transformers, accelerate and trl recognise a PEFT model by testing for peft's classes, so a
peftlab model would otherwise be trained and checkpointed as a plain full model. peftlab plugs in
with one explicit, idempotent call instead of a Trainer subclass (which would not reach trl's
``SFTTrainer`` or users' own Trainer subclasses) and instead of importing peft (which is not a
dependency) or patching anything on ``import peftlab``::

    import peftlab.integrations
    peftlab.integrations.enable_trainer_support()

See :mod:`peftlab.integrations.trainers` for exactly what the call changes.
"""

from peftlab.integrations.trainers import (
    disable_trainer_support,
    enable_trainer_support,
    is_peftlab_model,
    trainer_support_enabled,
)

__all__ = ["disable_trainer_support", "enable_trainer_support", "is_peftlab_model", "trainer_support_enabled"]
