"""Evaluation, in one room: what is measured (``metrics``), on which settings (``settings``), over which
rows (``sweep``, ``kl``), how it is shown (``tables``, ``plot``) and kept (``records``: report.json and
tune.json, written only inside ``io.output``'s atomic report directories); the strength search within
a cost budget (``budget``, ``search``, ``probe``, ``tune``) and lm-evaluation-harness (``lmeval``)."""
