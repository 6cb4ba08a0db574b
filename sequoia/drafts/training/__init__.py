"""Training drafts from the target: the distillation store (:mod:`~sequoia.drafts.training.data`),
the target's features (:mod:`~sequoia.drafts.training.features`), training
(:mod:`~sequoia.drafts.training.train`) and held-out evaluation (:mod:`~sequoia.drafts.training.evaluate`)."""
