"""The kinds of model actmerge bakes, behind one interface (``base.ModelKind``): language models
(``llm/``) and diffusers pipelines (``diffusers/``), each folder with the same pieces (``kind.py`` the
implementation, ``plan.py``, ``hooks.py``, ``collect.py``, ``verify.py``, ``card.py``, …).
``registry.kind_of`` is the one place that decides which kind a model argument is; the verbs then call
the kind's methods and never branch on the kind themselves. Nothing is imported here, so that a
kind's piece (e.g. ``kinds.llm.hooks``) can be imported on its own."""
